"""A real Prometheus (Debian's ``prometheus`` binary) scraping a real slimserve, and traffic to watch.

Used by ``tests/deploy/test_dashboards.py`` (every dashboard query must return data) and by
``scripts/plot-dashboards`` (pictures of the same queries for the README). The stack is what a
scaled-out deployment runs: ``slimserve serve --no-worker``-style API/serving process and a separate
``slimserve worker --metrics-port``, over one SQLite file, each scraped as its own Prometheus job
(``slimserve-api``, ``slimserve-worker``). Prometheus gets a config file of its own, a temporary
TSDB folder and a free loopback port, so a system Prometheus (Debian starts one on :9090 where
services may start) and its node exporter never take part.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.serverproc import ROOT, Proc, free_port, service_env, start_server, wait_for, wait_http, wait_job

#: Where Debian's package puts the binary.
PROMETHEUS = "/usr/bin/prometheus"
#: Scrape and rule evaluation every second: rates have samples a few seconds after traffic.
SCRAPE_INTERVAL = "1s"
API_JOB = "slimserve-api"
WORKER_JOB = "slimserve-worker"

DASHBOARDS = ROOT / "k8s" / "monitoring" / "dashboards"
#: The tiny MLP of tests/builders.py: x[batch, 16] -> logits[batch, 4].
FEATURES = 16
CLASSES = 4


def prometheus_binary() -> str | None:
    """The Prometheus server binary, or None when it is not installed."""
    found = shutil.which("prometheus")
    if found:
        return found
    return PROMETHEUS if os.access(PROMETHEUS, os.X_OK) else None


class PromQLError(RuntimeError):
    """Prometheus refused a query (bad PromQL, unknown function...)."""


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API (``popen`` None: one this process did not start)."""

    popen: subprocess.Popen[bytes] | None
    url: str
    log: Path | None = None

    @classmethod
    def at(cls, url: str) -> Prometheus:
        """An existing Prometheus server, e.g. ``http://prometheus:9090``."""
        return cls(None, url.rstrip("/"))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def _get(self, path: str, params: Mapping[str, Any] | list[tuple[str, Any]]) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        try:
            body = response.json()
        except ValueError:
            raise PromQLError(f"{path}: HTTP {response.status_code}: {response.text[:500]}") from None
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """``/api/v1/query``: the instant vector (or a scalar, as a one-item list) of ``expr`` at ``at``."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """``/api/v1/query_range``: one ``{"metric", "values"}`` per series."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return list(self._get("/api/v1/query_range", params)["result"])

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """``/api/v1/label/<label>/values``, optionally only over series matching ``match``."""
        params = [("match[]", match)] if match else []
        return [str(v) for v in self._get(f"/api/v1/label/{label}/values", params)]

    def scraped_after(self, moment: float, jobs: tuple[str, ...]) -> bool:
        """Whether every target of ``jobs`` was scraped (and up) after the wall-clock ``moment``."""
        # timestamp() of a plain selector is the scrape's time; of ``up == 1`` it would be the query's
        stamps = {row["metric"].get("job"): float(row["value"][1]) for row in self.query("timestamp(up)")}
        up = {row["metric"].get("job"): float(row["value"][1]) for row in self.query("up")}
        return all(stamps.get(job, 0.0) > moment and up.get(job) == 1 for job in jobs)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_prometheus(workdir: Path, targets: Mapping[str, str], *, binary: str | None = None) -> Prometheus:
    """Start Prometheus scraping ``{job name: "host:port"}`` (path ``/metrics``); returns once it is ready."""
    binary = binary or prometheus_binary()
    if binary is None:
        raise FileNotFoundError("no prometheus binary (apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
        },
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
            for job, target in targets.items()
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML: no YAML library needed
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(popen, f"http://127.0.0.1:{port}", log)
    try:
        wait_http(popen, f"{prom.url}/-/ready", "prometheus", prom.output, timeout=30)
    except RuntimeError:
        prom.stop()
        raise
    return prom


def start_worker_with_metrics(home: Path, metrics_port: int, **settings: str) -> Proc:
    """``slimserve worker --metrics-port P`` over ``home``'s database and artifacts."""
    log = home.parent / f"{home.name}-worker-{metrics_port}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--metrics-port", str(metrics_port)],
            cwd=ROOT,
            env=service_env(home, **settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Proc(popen, log, url=f"http://127.0.0.1:{metrics_port}")


@dataclass
class Stack:
    """The API/serving process, a worker, and Prometheus scraping both."""

    server: Proc
    worker: Proc
    prometheus: Prometheus
    home: Path
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{text[-3000:]}"
            for name, text in (
                ("server", self.server.output()),
                ("worker", self.worker.output()),
                ("prometheus", self.prometheus.output()),
            )
        )

    def wait_scraped(self, timeout: float = 30.0) -> float:
        """Wait until Prometheus scraped both processes after now; the moment waited for."""
        moment = time.time()
        wait_for(lambda: self.prometheus.scraped_after(moment, (API_JOB, WORKER_JOB)), timeout=timeout, interval=0.2)
        return moment


@contextlib.contextmanager
def slimserve_stack(workdir: Path, **server_settings: str) -> Iterator[Stack]:
    """Start server, worker and Prometheus; wait until Prometheus scrapes both. Everything stops at the end."""
    home = workdir / "home"
    common = {"poll_seconds": "0.2"}  # an idle worker claims a new job within 0.2 s, not 1 s
    settings = {
        "run_worker": "false",
        "registry_poll_seconds": "0.2",
        "drain_seconds": "0",
        **common,
        **server_settings,
    }
    with contextlib.ExitStack() as stack:
        server = start_server(home, env={f"SLIMSERVE_{k.upper()}": v for k, v in settings.items()})
        stack.callback(server.kill)
        # the server migrates the schema in the background; the worker must not race it on SQLite
        wait_for(lambda: httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200, timeout=60)
        worker_port = free_port()
        worker = start_worker_with_metrics(home, worker_port, **common)
        stack.callback(worker.kill)
        wait_for(lambda: _answers(f"{worker.url}/metrics") or worker.popen.poll() is not None, timeout=60)
        if worker.popen.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.popen.returncode}:\n{worker.output()[-3000:]}")
        prometheus = start_prometheus(
            workdir / "prometheus",
            {API_JOB: server.url.removeprefix("http://"), WORKER_JOB: worker.url.removeprefix("http://")},
        )
        stack.callback(prometheus.stop)
        result = Stack(server, worker, prometheus, home)
        try:
            result.wait_scraped()
        except TimeoutError:
            raise RuntimeError(f"prometheus never scraped both targets:\n{result.logs()}") from None
        yield result


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


# --------------------------------------------------------------------------- traffic


def upload_model(stack: Stack, name: str, model: Path, data: Path | bytes) -> str:
    """Upload a fast job; its id (or "" when the upload itself was refused)."""
    from tests.e2e.conftest import job_config, upload

    response = upload(stack.url, model, data, job_config(name))
    if response.status_code != 202:
        return ""
    job_id = str(response.json()["job"]["id"])
    stack.jobs[name] = {"id": job_id}
    return job_id


def finish_jobs(stack: Stack, timeout: float = 180.0) -> dict[str, str]:
    """Wait for every uploaded job's final status; ``{model name: status}``."""
    out = {}
    for name, job in stack.jobs.items():
        done = wait_job(stack.url, job["id"], timeout=timeout)
        job.update(done)
        out[name] = str(done["status"])
    return out


def wrong_width_data(samples: int = 32) -> bytes:
    """Sample data with 8 features for the 16-feature MLP: the upload is taken, the job fails."""
    import io

    rng = np.random.default_rng(4)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.normal(size=(samples, 8)).astype(np.float32), labels=rng.integers(0, CLASSES, samples))
    return buffer.getvalue()


def version_ready(url: str, model: str, version: int) -> bool:
    return _answers(f"{url}/v2/models/{model}/versions/{version}/ready")


def infer_body(x: np.ndarray, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    body.update(extra)
    return body


@dataclass
class TrafficResult:
    """What one burst of traffic did."""

    codes: dict[int, int] = field(default_factory=dict)
    feedback: dict[str, int] = field(default_factory=dict)


def _rows(request_id: str, n: int) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(request_id.encode())).normal(size=(n, FEATURES)).astype(np.float32)


def send_traffic(
    url: str,
    model: str,
    prefix: str,
    *,
    good: int = 48,
    bad: int = 4,
    explicit_versions: Mapping[int, int] | None = None,
    max_rows: int = 4,
    wrong_every: int = 4,
    concurrency: int = 8,
) -> TrafficResult:
    """``good`` requests to the model's default version (ids ``prefix-i``, 1..max_rows rows), ``bad`` ones
    refused with 400, ``explicit_versions`` ``{version: n}`` to named versions; then feedback on every id,
    every ``wrong_every``-th label wrong. Requests run ``concurrency`` at a time, so they share batches."""
    result = TrafficResult()
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(good):
        request_id = f"{prefix}-{i}"
        jobs.append(
            (request_id, f"/v2/models/{model}/infer", infer_body(_rows(request_id, 1 + i % max_rows), request_id))
        )
    for version, count in (explicit_versions or {}).items():
        for i in range(count):
            request_id = f"{prefix}-v{version}-{i}"
            path = f"/v2/models/{model}/versions/{version}/infer"
            jobs.append((request_id, path, infer_body(_rows(request_id, 1), request_id)))
    for i in range(bad):  # FP64 for an FP32 input: refused by the data plane, counted as 400
        body = infer_body(_rows(f"{prefix}-bad-{i}", 1))
        body["inputs"][0]["datatype"] = "FP64"
        jobs.append(("", f"/v2/models/{model}/infer", body))

    predictions: dict[str, list[int]] = {}
    with httpx.Client(base_url=url, timeout=60) as client:

        def send(job: tuple[str, str, dict[str, Any]]) -> int:
            request_id, path, body = job
            response = client.post(path, json=body)
            if response.status_code == 200 and request_id:
                (out,) = [o for o in response.json()["outputs"] if o["name"] == "logits"]
                logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
                predictions[request_id] = [int(c) for c in np.argmax(logits, axis=1)]
            return response.status_code

        with ThreadPoolExecutor(concurrency) as pool:
            for code in pool.map(send, jobs):
                result.codes[code] = result.codes.get(code, 0) + 1
        items = []
        for n, (request_id, classes) in enumerate(sorted(predictions.items())):
            labels = [(c + 1) % CLASSES for c in classes] if n % wrong_every == 0 else classes
            items.append({"id": request_id, "label": labels if len(labels) > 1 else labels[0]})
        if items:
            response = client.post(f"/v1/models/{model}/feedback", json=items)
            response.raise_for_status()
            result.feedback = dict(response.json())
    return result


# --------------------------------------------------------------------------- dashboards


#: ``$name``, ``${name}``, ``${name:format}`` and the old ``[[name]]``.
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*$")


def load_dashboard(name: str) -> dict[str, Any]:
    """``k8s/monitoring/dashboards/<name>.json``."""
    return dict(json.loads((DASHBOARDS / f"{name}.json").read_text()))


def all_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def used_variables(expr: str) -> set[str]:
    return {next(g for g in match.groups() if g) for match in VARIABLE.finditer(expr)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with every variable replaced; KeyError for one that ``values`` lacks."""
    return VARIABLE.sub(lambda match: values[next(g for g in match.groups() if g)], expr)


def regex_escape(value: str) -> str:
    """A label value as Grafana puts it into a regex matcher inside a PromQL string (backslashes doubled)."""
    return re.sub(r"[\\^$*+?.()|\[\]{}]", lambda m: "\\\\" + ("\\\\" if m.group(0) == "\\" else m.group(0)), value)


def resolve_variables(
    prometheus: Prometheus, dashboard: Mapping[str, Any], builtins: Mapping[str, str]
) -> dict[str, str]:
    """Each template variable's value as Grafana substitutes it with "All" selected: ``label_values()``
    queries are run (``(a|b)``, or "" when nothing matched); custom and interval ones take their current value."""
    values = dict(builtins)
    for var in dashboard["templating"]["list"]:
        name = var["name"]
        if var["type"] == "query":
            match = LABEL_VALUES.match(var["query"])
            if match is None:
                raise ValueError(f"variable {name}: not a label_values() query: {var['query']}")
            selector = substitute(match.group(1), values) if match.group(1) else None
            found = prometheus.label_values(match.group(2), selector)
            values[name] = "(" + "|".join(regex_escape(v) for v in sorted(found)) + ")" if found else ""
        elif var["type"] in ("custom", "interval", "constant", "textbox"):
            current = var.get("current", {}).get("value") or var.get("query", "")
            values[name] = str(current[0] if isinstance(current, list) else current)
        else:
            raise ValueError(f"variable {name}: type {var['type']} is not handled")
    return values
