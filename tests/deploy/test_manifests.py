"""The Kubernetes manifests (k8s/): rendered by the real ``kubectl kustomize``, validated offline, checked.

Every overlay is rendered as ``kubectl apply -k`` would render it. Each object is validated against
the Kubernetes OpenAPI schemas shipped by the ``kubernetes-validate`` package (strict: an unknown or
misspelled field is an error, as with the API server's strict field validation), the ServiceMonitor
against its CRD's schema (tests/deploy/schemas/servicemonitor-v1.json, made strict the same way).
Then the properties issue 6 asks for are asserted on the rendered objects, tied to the code where
the code decides them (setting names, metric names, the CLI's ports).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.metrics import ServingMetrics
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DASHBOARDS = K8S / "monitoring" / "dashboards"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ("cpu", "gpu")
#: The oldest Kubernetes minor the manifests target (autoscaling/v2 and policy/v1 are GA there).
K8S_VERSION = "1.30"
NAMESPACE = "slimserve"
HOME = "/var/lib/slimserve"
UID = 10001
#: Variables in the ConfigMap / Secret that are not slimserve settings but read by libraries.
LIBRARY_VARS = {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
#: Namespaced kinds among what the overlays render (everything but the Namespace).
CLUSTER_SCOPED = {"Namespace"}


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize FOLDER``, parsed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: it renders the kustomizations (kubectl kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass
class Rendered:
    """One overlay's rendered objects."""

    overlay: str
    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        """The object of this kind whose name is ``name`` or, for generated objects, ``name-<hash>``."""
        found = [
            o for o in self.all(kind) if re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
        ]
        assert len(found) == 1, (
            f"{self.overlay}: expected one {kind} {name}, found {[o['metadata']['name'] for o in found]}"
        )
        return found[0]

    def deployment(self, name: str) -> dict[str, Any]:
        return self.one("Deployment", name)

    def container(self, deployment: str) -> dict[str, Any]:
        containers = self.deployment(deployment)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        return dict(containers[0])

    def config(self) -> dict[str, str]:
        return dict(self.one("ConfigMap", "slimserve-config")["data"])

    def secret(self) -> dict[str, str]:
        data = self.one("Secret", "slimserve-secrets")["data"]
        return {key: base64.b64decode(value).decode() for key, value in data.items()}


# ids like "gpu-overlay", not "gpu": tests/conftest.py skips every test with a `gpu` keyword on machines
# without CUDA, and a parameter id becomes a keyword. Rendering the GPU overlay needs no GPU.
@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda overlay: f"{overlay}-overlay")
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(request.param, kustomize(K8S / "overlays" / request.param))


@pytest.fixture(scope="module")
def cpu() -> Rendered:
    return Rendered("cpu", kustomize(K8S / "overlays" / "cpu"))


def strict(schema: Any) -> Any:
    """``schema`` with unknown properties refused wherever it lists the known ones.

    A CRD's structural schema prunes unknown fields silently; ``kubectl apply`` (server-side
    strict field validation, the default since 1.27) refuses them. This makes the offline check
    refuse them too, so a misspelled field fails here rather than vanishing in the cluster.
    """
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


SERVICEMONITOR_SCHEMA = strict(json.loads((SCHEMAS / "servicemonitor-v1.json").read_text()))


def validate(obj: dict[str, Any]) -> None:
    """Raise a jsonschema ValidationError (or SchemaNotFoundError) if ``obj`` is not a valid object."""
    if obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor":
        jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA).validate(obj)
        # metadata is a bare object in a CRD's schema; the API server checks it as ObjectMeta.
        assert set(obj["metadata"]) <= {"name", "namespace", "labels", "annotations"}
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects ``labels``."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores, bytes)."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * _SUFFIXES.get(match.group(2), 1.0) if match.group(2) else float(match.group(1))


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def containers(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(deployment name, pod spec, container) for every container of every Deployment."""
    for deployment in rendered.all("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            yield deployment["metadata"]["name"], spec, container


# --- rendering and schemas ---------------------------------------------------------------------


def test_every_object_validates_against_its_schema(rendered: Rendered) -> None:
    kinds = {o["kind"] for o in rendered.objects}
    expected = {
        "Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor",
    }  # fmt: skip
    assert kinds == expected
    errors = []
    for obj in rendered.objects:
        try:
            validate(obj)
        except (jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            where = ".".join(str(part) for part in getattr(exc, "path", []))
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {getattr(exc, 'message', exc)}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        # a misspelled field
        ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={})),
        # a wrong type
        ("HorizontalPodAutoscaler", lambda o: o["spec"].update(minReplicas="two")),
        # a missing required field
        ("Service", lambda o: o["spec"]["ports"][0].pop("port")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(prot="metrics")),
        ("ServiceMonitor", lambda o: o["spec"].pop("selector")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
    ],
    ids=[
        "misspelled-field",
        "wrong-type",
        "missing-field",
        "sm-misspelled-field",
        "sm-missing-field",
        "sm-bad-pattern",
    ],
)
def test_validation_refuses_broken_objects(cpu: Rendered, kind: str, mutate: Any) -> None:
    """The validators are really engaged: the same objects, broken on purpose, are refused."""
    broken = copy.deepcopy(cpu.all(kind)[0])
    validate(copy.deepcopy(broken))
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_base_is_namespace_agnostic() -> None:
    objects = kustomize(K8S / "base")
    assert not [o for o in objects if "namespace" in o["metadata"] or o["kind"] == "Namespace"]
    # and the common labels are on every object, but in no selector
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "slimserve", obj["metadata"]["name"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        assert "app.kubernetes.io/part-of" not in deployment["spec"]["selector"]["matchLabels"]


def test_overlay_puts_everything_in_its_namespace(rendered: Rendered) -> None:
    namespace = rendered.one("Namespace", NAMESPACE)
    # The pods meet the restricted Pod Security Standard (test_pods_meet_restricted_pod_security), so it is enforced.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in rendered.objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


# --- the API/serving Deployment ---------------------------------------------------------------------


def test_api_runs_the_server_without_its_worker_and_metrics_on_their_own_port(rendered: Rendered) -> None:
    api = rendered.container("slimserve-api")
    assert api["command"] == ["slimserve"]
    assert api["args"] == ["serve", "--host", "0.0.0.0", "--no-worker"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": 8000, "metrics": 9100}
    env = env_of(api)
    assert int(env["SLIMSERVE_PORT"]) == ports["http"]
    assert int(env["SLIMSERVE_METRICS_PORT"]) == ports["metrics"]
    assert env["SLIMSERVE_RUN_WORKER"] == "false"


def test_api_probes(rendered: Rendered) -> None:
    api = rendered.container("slimserve-api")
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    probes = {name: api[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["startupProbe"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    for probe in probes.values():
        assert ports[probe["port"]] == 8000  # the API port, not the metrics port
    # The startup probe gives the process its whole start-up before liveness may restart it.
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_api_grace_period_covers_prestop_drain_and_shutdown(rendered: Rendered) -> None:
    """preStop sleep, then SIGTERM: SLIMSERVE_DRAIN_SECONDS not ready, then up to 30 s for in-flight requests."""
    pod = rendered.deployment("slimserve-api")["spec"]["template"]["spec"]
    api = rendered.container("slimserve-api")
    command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(rendered.config()["SLIMSERVE_DRAIN_SECONDS"])
    assert 0 < pre_stop <= 10, "a short pause for endpoint removal, not a second drain"
    assert drain > 0
    # 30 s: uvicorn's timeout_graceful_shutdown in service/cli.py
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 30


def test_worker_runs_the_standalone_worker_with_metrics(rendered: Rendered) -> None:
    worker = rendered.container("slimserve-worker")
    assert worker["command"] == ["slimserve"]
    args = worker["args"]
    assert args[0] == "worker"
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"metrics": 9100}
    assert int(args[args.index("--metrics-port") + 1]) == ports["metrics"]
    assert args[args.index("--metrics-host") + 1] == "0.0.0.0"
    assert worker["livenessProbe"]["httpGet"]["port"] == "metrics"
    # The worker never surges: a surge pod would need a spare GPU.
    assert rendered.deployment("slimserve-worker")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


# --- security and resources --------------------------------------------------------------------------


def test_pods_run_as_non_root_with_a_read_only_root(rendered: Rendered) -> None:
    for name, pod, container in containers(rendered):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == UID, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == UID, name
        assert ctx["readOnlyRootFilesystem"] is True, name
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"], name
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", name
        # The only writable paths: SLIMSERVE_HOME and /tmp, both emptyDir volumes.
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert set(mounts) == {HOME, "/tmp"}, name
        assert all("emptyDir" in volume for volume in mounts.values()), name
        assert env_of(container)["SLIMSERVE_HOME"] == HOME, name


def test_pods_meet_restricted_pod_security(rendered: Rendered) -> None:
    """The "restricted" Pod Security Standard, as the API server's admission checks it (the namespace enforces it)."""
    allowed_volumes = {
        "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
    }  # fmt: skip
    for name, pod, container in containers(rendered):
        assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= allowed_volumes, f"{name}: volume {volume}"
        ctx = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert not ctx.get("privileged"), name
        assert ctx.get("allowPrivilegeEscalation") is False, name
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, name
        assert ctx.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
        assert "ALL" in ctx["capabilities"]["drop"], name
        assert set(ctx["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, name
        assert not any("hostPort" in port for port in container.get("ports", [])), name


def test_containers_have_requests_and_limits(rendered: Rendered) -> None:
    for name, _, container in containers(rendered):
        resources = container["resources"]
        for resource in ("cpu", "memory", "ephemeral-storage"):
            request = quantity(resources["requests"][resource])
            limit = quantity(resources["limits"][resource])
            assert 0 < request <= limit, f"{name}: {resource} request {request} limit {limit}"
    # The emptyDir size limits fit in the ephemeral-storage limit (else the kubelet evicts first).
    for name, pod, container in containers(rendered):
        sizes = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in pod["volumes"] if "emptyDir" in v)
        assert sizes <= quantity(container["resources"]["limits"]["ephemeral-storage"]), name


def test_gpu_request_only_in_the_gpu_overlay(rendered: Rendered) -> None:
    for deployment in ("slimserve-worker", "slimserve-api"):
        pod = rendered.deployment(deployment)["spec"]["template"]["spec"]
        container = rendered.container(deployment)
        image = container["image"]
        if rendered.overlay == "gpu":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, deployment
            assert container["resources"]["requests"]["nvidia.com/gpu"] == 1, deployment
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert image == "slimserve:cuda", deployment
        else:
            assert "tolerations" not in pod and "nodeSelector" not in pod, deployment
            assert image == "slimserve:latest", deployment
    if rendered.overlay == "gpu":
        # CUDA reserves huge address ranges: the job child's address-space cap is lifted for GPU workers.
        worker_env = env_of(rendered.container("slimserve-worker"))
        assert int(worker_env["SLIMSERVE_JOB_MEMORY_BYTES"]) > 2**47  # x86-64's user address space
        assert rendered.one("HorizontalPodAutoscaler", "slimserve-api")["spec"]["maxReplicas"] <= 4
    else:
        assert "nvidia" not in yaml.safe_dump_all(rendered.objects)


# --- Services, autoscaling, disruption budget ----------------------------------------------------------


def test_services_select_their_pods_and_name_real_ports(rendered: Rendered) -> None:
    api, worker = rendered.deployment("slimserve-api"), rendered.deployment("slimserve-worker")
    for service_name, deployment, other in (("slimserve-api", api, worker), ("slimserve-worker", worker, api)):
        service = rendered.one("Service", service_name)
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment)), service_name
        assert not selects({"matchLabels": service["spec"]["selector"]}, pod_labels(other)), service_name
        container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, f"{service_name}: {port}"
    api_ports = {p["name"]: p["port"] for p in rendered.one("Service", "slimserve-api")["spec"]["ports"]}
    assert api_ports == {"http": 8000, "metrics": 9100}
    worker_ports = {p["name"]: p["port"] for p in rendered.one("Service", "slimserve-worker")["spec"]["ports"]}
    assert worker_ports == {"metrics": 9100}


def test_hpa_scales_the_api_on_cpu_and_queue_depth(rendered: Rendered) -> None:
    hpa = rendered.one("HorizontalPodAutoscaler", "slimserve-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "slimserve-api"}
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(by_type) == {"Resource", "Pods"}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert by_type["Resource"]["resource"]["target"]["type"] == "Utilization"
    pods = by_type["Pods"]["pods"]
    assert pods["metric"]["name"] == "slimserve_inference_queue_depth"
    assert pods["target"]["type"] == "AverageValue" and quantity(pods["target"]["averageValue"]) > 0
    # a CPU target is a percentage of the request: the API must request CPU
    assert "cpu" in rendered.container("slimserve-api")["resources"]["requests"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # the HPA owns the replica count: a count in the Deployment would reset it on every apply
    assert "replicas" not in rendered.deployment("slimserve-api")["spec"]


def test_queue_depth_metric_is_served_by_slimserve_and_the_adapter_rule() -> None:
    """The HPA's Pods metric is a real slimserve metric, and the documented adapter rule serves it per pod."""
    registry = CollectorRegistry()
    ServingMetrics(registry)
    names = {metric.name for metric in registry.collect()}
    assert "slimserve_inference_queue_depth" in names
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    custom = {rule["name"]["as"]: rule for rule in rules["custom"]}
    rule = custom["slimserve_inference_queue_depth"]
    assert rule["seriesQuery"].startswith("slimserve_inference_queue_depth{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert re.fullmatch(rule["name"]["matches"], "slimserve_inference_queue_depth")
    for external in rules.get("external", []):
        assert re.fullmatch(external["name"]["matches"], external["name"]["as"])


def test_pdb_keeps_an_api_replica_and_lets_drains_progress(rendered: Rendered) -> None:
    pdb = rendered.one("PodDisruptionBudget", "slimserve-api")
    assert selects(pdb["spec"]["selector"], pod_labels(rendered.deployment("slimserve-api")))
    assert not selects(pdb["spec"]["selector"], pod_labels(rendered.deployment("slimserve-worker")))
    hpa = rendered.one("HorizontalPodAutoscaler", "slimserve-api")
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# --- settings ---------------------------------------------------------------------------------------------


def test_config_and_secret_hold_real_settings(rendered: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    config, secret = rendered.config(), rendered.secret()
    fields = {f"SLIMSERVE_{name.upper()}" for name in Settings.model_fields}
    for key in [*config, *secret]:
        assert key in fields or key in LIBRARY_VARS, f"{key} is not a slimserve setting (service/settings.py)"
    assert config["SLIMSERVE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert ":" not in (urlsplit(config["SLIMSERVE_DATABASE_URL"]).netloc.split("@")[0]), "password in a ConfigMap"
    assert config["SLIMSERVE_STORAGE_URL"].startswith("s3://")
    assert set(secret) == {
        "SLIMSERVE_ADMIN_KEYS", "SLIMSERVE_INFER_KEYS", "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    }  # fmt: skip
    for key, value in secret.items():
        assert value.startswith("REPLACE-ME"), f"{key}: placeholders only, clearly marked"
    # Both Deployments load both, under their generated (hashed) names.
    config_name = rendered.one("ConfigMap", "slimserve-config")["metadata"]["name"]
    secret_name = rendered.one("Secret", "slimserve-secrets")["metadata"]["name"]
    for deployment in ("slimserve-api", "slimserve-worker"):
        refs = rendered.container(deployment)["envFrom"]
        assert refs == [{"configMapRef": {"name": config_name}}, {"secretRef": {"name": secret_name}}]
    # What the API process gets parses as slimserve's settings, with auth on (it binds 0.0.0.0).
    for key in [k for k in os.environ if k.startswith("SLIMSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in {**config, **secret, **env_of(rendered.container("slimserve-api"))}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.auth_enabled and settings.run_worker is False
    assert settings.database.startswith("postgresql+psycopg://") and settings.storage.startswith("s3://")
    assert settings.metrics_port == 9100 and str(settings.home) == HOME


# --- NetworkPolicy -----------------------------------------------------------------------------------------


def test_worker_egress_is_limited_to_dns_database_and_storage(rendered: Rendered) -> None:
    policy = rendered.one("NetworkPolicy", "slimserve-worker")
    spec = policy["spec"]
    assert selects(spec["podSelector"], pod_labels(rendered.deployment("slimserve-worker")))
    assert not selects(spec["podSelector"], pod_labels(rendered.deployment("slimserve-api")))
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    allowed = set()
    for rule in spec["egress"]:
        assert rule.get("ports"), f"an egress rule without ports allows everything: {rule}"
        allowed |= {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]}
    database_port = urlsplit(rendered.config()["SLIMSERVE_DATABASE_URL"]).port or 5432
    assert allowed == {(53, "UDP"), (53, "TCP"), (database_port, "TCP"), (443, "TCP"), (9000, "TCP")}
    # ingress: only Prometheus on the metrics port
    assert [p for rule in spec["ingress"] for p in rule["ports"]] == [{"port": "metrics", "protocol": "TCP"}]


# --- monitoring ---------------------------------------------------------------------------------------------


def test_servicemonitor_scrapes_the_metrics_port_of_api_and_worker(rendered: Rendered) -> None:
    monitor = rendered.one("ServiceMonitor", "slimserve")
    selected = [s for s in rendered.all("Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert sorted(s["metadata"]["name"] for s in selected) == ["slimserve-api", "slimserve-worker"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        for service in selected:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, service["metadata"]["name"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_dashboards_configmap_has_the_sidecar_label_and_every_dashboard(rendered: Rendered) -> None:
    configmap = rendered.one("ConfigMap", "slimserve-dashboards")
    assert configmap["metadata"]["name"] == "slimserve-dashboards"  # no hash suffix (kustomization.yaml says why)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "no dashboards in k8s/monitoring/dashboards"
    assert sorted(configmap["data"]) == [f.name for f in files]
    for file in files:
        assert configmap["data"][file.name] == file.read_text()
        dashboard = json.loads(configmap["data"][file.name])
        assert dashboard["uid"] and dashboard["panels"], file.name
    # Client-side `kubectl apply` copies the whole object into the last-applied-configuration
    # annotation, and all annotations together may not exceed 256 KiB: past that, apply fails.
    assert len(json.dumps(configmap)) < 256 * 1024 - 4096, "dashboards too large for kubectl apply; split the ConfigMap"
