"""docker-compose.yml and the Prometheus / Grafana files it mounts, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema (vendored in
tests/deploy/schemas/compose-spec.json), as written and after variable interpolation with an empty
environment (``docker compose up`` must work without a .env file). The settings it hands the API
and the worker are parsed by slimserve's own Settings class. Every host path it bind-mounts must
exist; the Prometheus configuration must scrape the compose services on their metrics ports (and
pass ``promtool check config`` where Debian's prometheus package is installed); Grafana's
provisioning must load the dashboards folder and provide the datasource uid the dashboards use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml

from service.settings import Settings
from tests import builders
from tests.serverproc import FAST_JOB, Proc, free_port, running, wait_for, wait_job

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA = json.loads((Path(__file__).resolve().parent / "schemas" / "compose-spec.json").read_text())
MONITORING = REPO / "k8s" / "monitoring"
#: Variables in the services' environment that are not slimserve settings but read by libraries.
LIBRARY_VARS = {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "HOME"}
SCALE_OUT = ("postgres", "minio", "minio-init")

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``).

    A variable that has no value and no default is an error here (compose would warn and use ""),
    so the file must give every variable a default.
    """
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") if match.group("braced") is not None else match.group("bare")
        name, op, default = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", expression, re.S).groups()  # type: ignore[union-attr]
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if name in env:
            return env[name]
        raise AssertionError(f"${{{expression}}} has no default: `docker compose up` needs it set")

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The file as compose sees it with no variables set."""
    return dict(interpolate(raw, {}))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume of a service, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        out.append((source, target))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def metrics_port(service: dict[str, Any]) -> int:
    """The port a slimserve service serves /metrics on, as its own command and settings say."""
    command = service["command"]
    if "--metrics-port" in command:
        return int(command[command.index("--metrics-port") + 1])
    return int(environment(service)["SLIMSERVE_METRICS_PORT"])


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = {int(str(port).split(":")[-1].split("/")[0]) for port in service.get("ports", [])}
    return ports | {int(port) for port in service.get("expose", [])}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """slimserve's Settings as a process with exactly these SLIMSERVE_ variables would read them."""
    for key in [k for k in os.environ if k.startswith("SLIMSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


# --- the file itself --------------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    validator_class = jsonschema.validators.validator_for(SCHEMA)
    validator_class.check_schema(SCHEMA)
    validator = validator_class(SCHEMA)
    for document in (raw, compose):
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["services"]["api"].update(helthcheck={}),  # a misspelled key
        lambda c: c["services"]["api"].update(ports="8000:8000"),  # a wrong type
        lambda c: c.update(service={}),  # an unknown top-level key
        lambda c: c["services"]["worker"]["depends_on"]["api"].pop("condition"),  # a missing required key
    ],
    ids=["misspelled-key", "wrong-type", "unknown-top-level-key", "missing-required-key"],
)
def test_schema_refuses_broken_compose_files(raw: dict[str, Any], mutate: Any) -> None:
    """The schema is really engaged: the same file, broken on purpose, is refused."""
    broken = json.loads(json.dumps(raw))
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_every_variable_has_a_default(raw: dict[str, Any]) -> None:
    # interpolate() raises for a variable without a default; this shows the check bites.
    interpolate(raw, {})
    with pytest.raises(AssertionError, match="no default"):
        interpolate({"x": "${UNSET_WITHOUT_DEFAULT}"}, {})
    assert interpolate("$${HOME} ${A:-b} ${C-d} ${E:-}", {"C": ""}) == "${HOME} b  "


def test_bind_mounted_paths_and_build_context_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for source, target in mounts(service):
            assert target.startswith("/"), f"{name}: {target}"
            if is_bind(source):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"
        if "build" in service:
            context = service["build"] if isinstance(service["build"], str) else service["build"]["context"]
            assert (REPO / context / "Dockerfile").is_file(), f"{name}: no Dockerfile in {context}"


def test_published_ports_listen_on_loopback_only(compose: dict[str, Any]) -> None:
    """The default keys and passwords are for a laptop: nothing is published beyond 127.0.0.1."""
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


# --- the API and the worker ---------------------------------------------------------------------------------


def test_api_and_worker_are_slimserve_with_the_same_storage(compose: dict[str, Any]) -> None:
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    assert api["build"] == worker["build"] == "." and api["image"] == worker["image"]
    assert api["command"] == ["serve", "--host", "0.0.0.0", "--no-worker"]
    command = worker["command"]
    assert command[0] == "worker" and command[command.index("--metrics-host") + 1] == "0.0.0.0"
    api_env, worker_env = environment(api), environment(worker)
    shared = ("SLIMSERVE_HOME", "SLIMSERVE_DATABASE_URL", "SLIMSERVE_STORAGE_URL", "SLIMSERVE_S3_ENDPOINT_URL")
    for key in shared:
        assert api_env[key] == worker_env[key], key
    # one named volume at SLIMSERVE_HOME, the same for both (the SQLite file and the artifacts)
    home = api_env["SLIMSERVE_HOME"]
    api_home = [source for source, target in mounts(api) if target == home]
    assert len(api_home) == 1 and not is_bind(api_home[0])
    assert api_home == [source for source, target in mounts(worker) if target == home]
    fields = {f"SLIMSERVE_{field.upper()}" for field in Settings.model_fields}
    for name, service in (("api", api), ("worker", worker)):
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        for key in environment(service):
            assert key in fields or key in LIBRARY_VARS, f"{name}: {key} is not a slimserve setting"
    # The worker starts once the API's health check passes (it checks readiness: the schema is migrated).
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    assert "/v2/health/ready" in " ".join(api["healthcheck"]["test"])
    assert f":{metrics_port(worker)}/metrics" in " ".join(worker["healthcheck"]["test"])


def test_api_settings_by_default(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set: SQLite and artifacts on the shared volume, an admin key (binding 0.0.0.0 needs one)."""
    api = compose["services"]["api"]
    settings = settings_from(environment(api), monkeypatch)
    assert settings.auth_enabled, "slimserve serve --host 0.0.0.0 exits 2 without an admin key"
    assert settings.run_worker is True  # the --no-worker flag turns it off (service/cli.py)
    assert settings.database == f"sqlite:///{settings.home}/slimserve.db"
    assert settings.storage == f"{settings.home}/artifacts"
    assert settings.metrics_port == metrics_port(api) and settings.metrics_port in container_ports(api)
    assert settings.port in container_ports(api)


def test_scale_out_profile(raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented scale-out variables point the API and the worker at the profile's Postgres and MinIO."""
    text = COMPOSE_FILE.read_text()
    documented = dict(re.findall(r"^#\s+export (SLIMSERVE_[A-Z0-9_]+)=(\S+)$", text, re.M))
    assert set(documented) == {"SLIMSERVE_DATABASE_URL", "SLIMSERVE_STORAGE_URL", "SLIMSERVE_S3_ENDPOINT_URL"}
    compose = interpolate(raw, documented)
    services = compose["services"]
    for name in SCALE_OUT:
        assert services[name]["profiles"] == ["scale-out"], name
    for name in ("api", "worker", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start without a profile"
        if name in ("api", "worker"):
            for dependency in ("postgres", "minio-init"):
                assert services[name]["depends_on"][dependency]["required"] is False, name

    settings = settings_from(environment(services["worker"]), monkeypatch)
    database = urlsplit(settings.database)
    postgres = environment(services["postgres"])
    assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres"
    assert database.username == postgres["POSTGRES_USER"] and database.path == f"/{postgres['POSTGRES_DB']}"
    # the password reaches libpq as PGPASSWORD, the same value Postgres is started with
    assert environment(services["worker"])["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
    bucket = settings.storage.removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])
    endpoint = urlsplit(settings.s3_endpoint_url or "")
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    minio = environment(services["minio"])
    assert environment(services["worker"])["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert environment(services["worker"])["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]


def start(command: list[str], env: dict[str, str], log: Path) -> Proc:
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *command], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Proc(popen, log)


def passes(healthcheck: list[str], substitutions: dict[str, str]) -> bool:
    """Run a service's ``CMD python -c ...`` health check here, with its addresses substituted."""
    assert healthcheck[:2] == ["CMD", "python"], healthcheck
    argv = [sys.executable, *(_substitute(arg, substitutions) for arg in healthcheck[2:])]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def _substitute(text: str, substitutions: dict[str, str]) -> str:
    for old, new in substitutions.items():
        text = text.replace(old, new)
    return text


@pytest.mark.slow
def test_api_and_worker_services_run_as_configured(compose: dict[str, Any], tmp_path: Path) -> None:
    """The api and worker services' commands and environment, run as real processes (there is no Docker here).

    A folder stands in for the shared named volume; ports are moved to free ones and 0.0.0.0 to
    127.0.0.1, nothing else changes. The API's health check passes, then (as `depends_on` orders it)
    the worker starts; a job uploaded with the default admin key is run by the separate worker
    through the shared SQLite file and artifact folder, and the API serves its result; each process
    serves its metrics on the port Prometheus scrapes; the worker's health check passes; both stop
    cleanly on SIGTERM within their stop_grace_period.
    """
    services = compose["services"]
    api, worker = services["api"], services["worker"]
    volume = tmp_path / "slimserve-data"
    volume.mkdir()
    api_port, api_metrics, worker_metrics = free_port(), free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}

    def env_of(service: dict[str, Any], tmp: Path, **overrides: str) -> dict[str, str]:
        tmp.mkdir()
        env = {k: v.replace("/var/lib/slimserve", str(volume)) for k, v in environment(service).items()}
        return {**base, **env, "HOME": str(tmp), "TMPDIR": str(tmp), **overrides}

    api_env = env_of(api, tmp_path / "api-tmp", SLIMSERVE_PORT=str(api_port), SLIMSERVE_METRICS_PORT=str(api_metrics))
    api_command = [arg.replace("0.0.0.0", "127.0.0.1") for arg in api["command"]]
    worker_command = [arg.replace("0.0.0.0", "127.0.0.1") for arg in worker["command"]]
    worker_command[worker_command.index("--metrics-port") + 1] = str(worker_metrics)
    url = f"http://127.0.0.1:{api_port}"
    key = api_env["SLIMSERVE_ADMIN_KEYS"].split(",")[0]

    with running(start(api_command, api_env, tmp_path / "api.log")) as api_proc:
        health = {"127.0.0.1:8000": f"127.0.0.1:{api_port}", "127.0.0.1:9100": f"127.0.0.1:{worker_metrics}"}
        deadline = time.monotonic() + 90
        while not passes(api["healthcheck"]["test"], health):
            assert api_proc.popen.poll() is None, api_proc.output()[-3000:]
            assert time.monotonic() < deadline, "the API never passed its health check:\n" + api_proc.output()[-3000:]
            time.sleep(0.5)
        worker_env = env_of(worker, tmp_path / "worker-tmp")
        with running(start(worker_command, worker_env, tmp_path / "worker.log")) as worker_proc:
            model, data = builders.mlp_onnx(tmp_path / "mlp.onnx"), builders.mlp_data(tmp_path / "mlp.npz")
            response = httpx.post(
                f"{url}/v1/models",
                files={"model": ("mlp.onnx", model.read_bytes()), "data": ("mlp.npz", data.read_bytes())},
                data={"config": json.dumps({"name": "compose-mlp", **FAST_JOB})},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert response.status_code == 202, response.text
            job = wait_job(url, response.json()["job"]["id"], headers={"Authorization": f"Bearer {key}"})
            assert job["status"] == "succeeded", (job, worker_proc.output()[-3000:])
            # The API serves the worker's version from the shared artifact folder.
            auth = {"Authorization": f"Bearer {key}"}
            ready = f"{url}/v2/models/compose-mlp/versions/{job['version']}/ready"
            wait_for(lambda: httpx.get(ready, headers=auth, timeout=10).status_code == 200)
            request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
            answer = httpx.post(f"{url}/v2/models/compose-mlp/infer", json=request, headers=auth, timeout=30)
            assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1, 4], answer.text
            # The worker ran it (the API has no in-process worker), and Prometheus's targets answer.
            worker_text = httpx.get(f"http://127.0.0.1:{worker_metrics}/metrics", timeout=10).text
            assert 'slimserve_optimization_jobs_total{status="succeeded"} 1.0' in worker_text
            api_text = httpx.get(f"http://127.0.0.1:{api_metrics}/metrics", timeout=10).text
            assert "slimserve_optimization_queue_depth 0.0" in api_text
            assert 'slimserve_optimization_jobs_total{status="succeeded"} 0.0' in api_text
            assert passes(worker["healthcheck"]["test"], health)
            # docker compose stop: SIGTERM, then SIGKILL after stop_grace_period.
            assert worker_proc.stop(signal.SIGTERM, timeout=seconds(worker["stop_grace_period"])) == 0
        assert api_proc.stop(signal.SIGTERM, timeout=seconds(api["stop_grace_period"])) == 0


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


# --- Prometheus ------------------------------------------------------------------------------------------------


def prometheus_config(compose: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    prometheus = compose["services"]["prometheus"]
    flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    target = flag.split("=", 1)[1]
    source = next(source for source, mounted in mounts(prometheus) if mounted == target)
    path = REPO / source
    return path, dict(yaml.safe_load(path.read_text()))


def test_prometheus_scrapes_api_and_worker_metrics_ports(compose: dict[str, Any]) -> None:
    path, config = prometheus_config(compose)
    assert path == MONITORING / "prometheus" / "prometheus.yml"
    scraped: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        targets = set()
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A"
            targets |= {(name, int(sd["port"])) for name in sd["names"]}
        for static in job.get("static_configs", []):
            targets |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]}
        scraped[job["job_name"]] = targets
    # Job names are the Kubernetes Service names (the ServiceMonitor's job label), so queries work in both.
    services = compose["services"]
    assert scraped["slimserve-api"] == {("api", metrics_port(services["api"]))}
    assert scraped["slimserve-worker"] == {("worker", metrics_port(services["worker"]))}
    for name, port in scraped["slimserve-api"] | scraped["slimserve-worker"]:
        assert port in container_ports(services[name]), f"{name} does not expose {port}"


def test_promtool_accepts_the_prometheus_config(compose: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian package prometheus)")
    path, _ = prometheus_config(compose)
    done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- Grafana ----------------------------------------------------------------------------------------------------


def grafana_mount(compose: dict[str, Any], target: str) -> Path:
    grafana = compose["services"]["grafana"]
    return REPO / next(source for source, mounted in mounts(grafana) if mounted == target)


def test_grafana_provisions_the_prometheus_datasource(compose: dict[str, Any]) -> None:
    folder = grafana_mount(compose, "/etc/grafana/provisioning/datasources")
    datasources = [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load(f.read_text())["datasources"]]
    assert len(datasources) == 1
    datasource = datasources[0]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus" and datasource["isDefault"]
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"] and url.port in container_ports(compose["services"][url.hostname])
    assert url.hostname == "prometheus"


def test_grafana_loads_every_dashboard_and_they_use_the_provisioned_datasource(compose: dict[str, Any]) -> None:
    providers_folder = grafana_mount(compose, "/etc/grafana/provisioning/dashboards")
    providers = [p for f in sorted(providers_folder.glob("*.yaml")) for p in yaml.safe_load(f.read_text())["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    mounted_at = providers[0]["options"]["path"]
    dashboards = grafana_mount(compose, mounted_at)
    assert dashboards == MONITORING / "dashboards"
    files = sorted(dashboards.glob("*.json"))
    assert files
    home = environment(compose["services"]["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(mounted_at + "/") and (dashboards / home.removeprefix(mounted_at + "/")).is_file()

    datasource_uids = {
        d["uid"]
        for f in grafana_mount(compose, "/etc/grafana/provisioning/datasources").glob("*.yaml")
        for d in yaml.safe_load(f.read_text())["datasources"]
    }

    def references(node: Any) -> list[dict[str, Any]]:
        if isinstance(node, dict):
            found = [node["datasource"]] if isinstance(node.get("datasource"), dict) else []
            return found + [ref for value in node.values() for ref in references(value)]
        if isinstance(node, list):
            return [ref for item in node for ref in references(item)]
        return []

    for file in files:
        refs = [ref for ref in references(json.loads(file.read_text())) if ref.get("type") == "prometheus"]
        assert refs, f"{file.name} queries no Prometheus datasource"
        unknown = {ref.get("uid") for ref in refs} - datasource_uids
        assert not unknown, f"{file.name} names datasource uids {unknown}; provisioned: {datasource_uids}"
