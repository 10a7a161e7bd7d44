"""The Grafana dashboards in k8s/monitoring/dashboards, checked as JSON and against a real Prometheus.

Every panel query of every dashboard is run by Debian's Prometheus, which scrapes a real
``slimserve serve`` (API and serving, no in-process worker) and a real ``slimserve worker
--metrics-port`` after three jobs (one succeeds, one fails, one is cancelled once its version 1
serves), inference traffic to both served models (some refused with 400, some to version 1 by name)
and feedback (some labels wrong). A query must come back with at least one finite number, so a
misspelt metric or label, a wrong ``by`` or ``on`` clause (two models, so label sets differ), or a
ratio that is always NaN fails its own case, named ``<dashboard>/<panel id>-<title>/<refId>``.
Template variables are resolved the way Grafana does it: each ``label_values(...)`` query is run
(and must find values), multi-value selections become ``(a|b)`` regexes.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.metrics import ServingMetrics
from tests.builders import mlp_data, mlp_onnx
from tests.deploy.promserver import (
    DASHBOARDS,
    LABEL_VALUES,
    Stack,
    all_panels,
    finish_jobs,
    infer_body,
    load_dashboard,
    prometheus_binary,
    resolve_variables,
    send_traffic,
    slimserve_stack,
    substitute,
    upload_model,
    used_variables,
    version_ready,
    wrong_width_data,
)
from tests.e2e.conftest import metric
from tests.serverproc import wait_for

NAMES = ("slimserve-overview", "slimserve-model-quality", "slimserve-jobs", "slimserve-resources")
#: The provisioned datasource's uid (k8s/monitoring/grafana provisioning names it so).
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
#: Grafana's own variables, with values that fit a Prometheus holding about a minute of 1 s scrapes:
#: every window reaches back past the scrape taken before the traffic started.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
GPU_METRIC = "slimserve_gpu_"
#: Two served models: a wrong ``on (...)`` / ``by (...)`` clause only shows once label sets differ.
MODEL, OTHER = "m", "m2"
FAILING = "broken"


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel_id: int
    title: str
    ref: str
    expr: str

    @property
    def ident(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")
        return f"{self.dashboard.removeprefix('slimserve-')}/{self.panel_id}-{slug}/{self.ref}"


def _readable() -> list[tuple[str, dict[str, Any]]]:
    """The dashboards that exist and parse (the others fail test_every_dashboard_is_there / ..._is_valid)."""
    out = []
    for name in NAMES:
        try:
            out.append((name, load_dashboard(name)))
        except (OSError, ValueError):
            continue
    return out


def queries() -> list[Query]:
    """Every panel target of every dashboard (read at collection time)."""
    return [
        Query(name, panel.get("id", -1), panel.get("title", ""), target.get("refId", "?"), target.get("expr", ""))
        for name, dashboard in _readable()
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


QUERIES = queries()
QUERY_VARIABLES = [
    (name, var["name"])
    for name, dashboard in _readable()
    for var in dashboard.get("templating", {}).get("list", [])
    if var.get("type") == "query"
]


# --------------------------------------------------------------------------- the JSON itself


def test_every_dashboard_is_there() -> None:
    present = {path.stem for path in DASHBOARDS.glob("*.json")}
    assert set(NAMES) <= present, f"missing dashboards: {sorted(set(NAMES) - present)}"
    assert len(QUERIES) >= 40, f"only {len(QUERIES)} panel queries found"


def _overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
    )


@pytest.mark.parametrize("name", NAMES)
def test_dashboard_model_is_valid(name: str) -> None:
    """Valid JSON, a fixed uid, unique panel ids, the provisioned datasource everywhere, a tidy grid."""
    text = (DASHBOARDS / f"{name}.json").read_text()
    dashboard = json.loads(text)
    assert dashboard["uid"] == name, "the uid must be fixed (links and provisioning rely on it)"
    assert dashboard.get("id") is None, "a provisioned dashboard carries no database id"
    assert dashboard["title"].startswith("slimserve / ")
    assert "slimserve" in dashboard["tags"]
    assert 36 <= dashboard["schemaVersion"] <= 41, dashboard["schemaVersion"]
    assert "${DS_" not in text and "__inputs" not in dashboard, "an export-for-sharing datasource input"

    panels = list(all_panels(dashboard))
    ids = [panel.get("id") for panel in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted({str(i) for i in ids if ids.count(i) > 1})}"

    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]
            assert LABEL_VALUES.match(var["query"]), f"variable {var['name']}: not a label_values() query"
    defined = set(variables) | set(BUILTINS)

    placed: list[tuple[str, dict[str, int]]] = []
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        grid = panel["gridPos"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, where
        clash = [other for other, pos in placed if _overlaps(grid, pos)]
        assert not clash, f"{where} overlaps {clash}"
        placed.append((where, grid))
        if panel["type"] == "row":
            assert not panel.get("targets"), where
            continue
        assert panel.get("title") and panel.get("description"), f"{where}: title and description"
        assert panel["datasource"] == DATASOURCE, where
        targets = panel.get("targets", [])
        assert targets, f"{where}: no query"
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds {refs}"
        for target in targets:
            assert target.get("datasource") == DATASOURCE, f"{where} {target['refId']}"
            assert target.get("expr", "").strip(), f"{where} {target['refId']}: empty query"
            unknown = used_variables(target["expr"]) - defined
            assert not unknown, f"{where} {target['refId']}: undefined variables {unknown}"


# --------------------------------------------------------------------------- the in-flight gauge


def test_in_flight_series_exist_only_for_registered_versions() -> None:
    registry = CollectorRegistry(auto_describe=False)
    metrics = ServingMetrics(registry)

    def value() -> float | None:
        return registry.get_sample_value("slimserve_inference_requests_in_flight", {"model": "a", "version": "1"})

    assert metrics.entered("a", 1) is None, "a request for an unregistered version made a series"
    assert value() is None
    metrics.register("a", 1, None)
    assert value() == 0
    first, second = metrics.entered("a", 1), metrics.entered("a", 1)
    assert first is not None and second is not None and value() == 2
    first.dec()
    assert value() == 1
    metrics.unregister("a", 1)  # unloaded while a request is still in flight
    second.dec()
    assert value() is None, "answering after the unload brought the series back"
    metrics.register("a", 1, None)
    assert value() == 0, "a detached decrement leaked into a re-registered series"


def test_requests_are_counted_by_code_only_for_registered_versions() -> None:
    registry = CollectorRegistry(auto_describe=False)
    metrics = ServingMetrics(registry)

    def count(code: str) -> float | None:
        labels = {"model": "a", "version": "1", "code": code}
        return registry.get_sample_value("slimserve_inference_requests_total", labels)

    metrics.request("a", 1, 200, 0.01)
    assert count("200") is None, "a request for an unregistered version made a series"
    metrics.register("a", 1, None)
    for code in (200, 200, 404, 418):  # a code outside the fixed set is counted as 500
        metrics.request("a", 1, code, 0.01)
    assert (count("200"), count("404"), count("500"), count("418")) == (2, 1, 1, None)
    labels = {"model": "a", "version": "1"}
    assert registry.get_sample_value("slimserve_inference_request_duration_seconds_count", labels) == 4
    metrics.unregister("a", 1)
    metrics.request("a", 1, 200, 0.01)
    assert count("200") is None, "a request answered after the unload brought the series back"


# --------------------------------------------------------------------------- against a real Prometheus


@dataclass
class Observed:
    """The stack after the traffic, and the moment every query is evaluated at."""

    stack: Stack
    at: float
    variables: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """Server, worker and Prometheus, after three jobs, inference traffic and feedback."""
    if prometheus_binary() is None:
        pytest.skip("Prometheus is not installed: apt-get install prometheus (Debian's /usr/bin/prometheus)")
    workdir = tmp_path_factory.mktemp("dashboards")
    model, data = mlp_onnx(workdir / "mlp.onnx"), mlp_data(workdir / "mlp.npz")
    # lone requests wait 20 ms for company, so the thread pool's requests share batches
    with slimserve_stack(workdir, max_queue_delay_microseconds="20000") as stack:
        try:
            assert upload_model(stack, MODEL, model, data)
            failing = upload_model(stack, FAILING, model, wrong_width_data())
            other = upload_model(stack, OTHER, model, data)  # runs last, one worker: cancelled once v1 serves
            assert other
            wait_for(lambda: version_ready(stack.url, OTHER, 1), timeout=180)
            httpx.post(f"{stack.url}/v1/jobs/{other}/cancel", timeout=30)  # 409 if it just finished: fine
            statuses = finish_jobs(stack)
            assert statuses[MODEL] == "succeeded", stack.jobs[MODEL]
            assert not failing or statuses[FAILING] == "failed", stack.jobs[FAILING]
            assert statuses[OTHER] in ("cancelled", "succeeded"), stack.jobs[OTHER]
            versions = [(MODEL, 1), (MODEL, 2), (OTHER, 1)] + [(OTHER, 2)] * (statuses[OTHER] == "succeeded")
            wait_for(lambda: all(version_ready(stack.url, name, v) for name, v in versions), timeout=60)
            # a scrape with every new series at 0 before any request: rate() and increase() count them all
            stack.wait_scraped()
            for name, good in ((MODEL, 48), (OTHER, 16)):
                traffic = send_traffic(stack.url, name, name, good=good, bad=4, explicit_versions={1: 8})
                assert traffic.codes == {200: good + 8, 400: 4}, traffic.codes
                assert traffic.feedback["correct"] > 0 and traffic.feedback["incorrect"] > 0, traffic.feedback
            stack.wait_scraped()
            at = time.time()
            variables = {name: resolve_variables(stack.prometheus, load_dashboard(name), BUILTINS) for name in NAMES}
        except BaseException:
            print(stack.logs())
            raise
        yield Observed(stack, at, variables)


def gpu_here() -> bool:
    """Whether NVML answers with at least one GPU (then the server exports slimserve_gpu_*)."""
    try:
        pynvml = importlib.import_module("pynvml")  # optional: NVIDIA's nvidia-ml-py
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name,var", QUERY_VARIABLES)
def test_template_variable_finds_values(observed: Observed, name: str, var: str) -> None:
    assert observed.variables[name][var], f"{name}: variable {var} found no values"


@pytest.mark.slow
@pytest.mark.parametrize("query", QUERIES, ids=[q.ident for q in QUERIES])
def test_panel_query_returns_data(observed: Observed, query: Query) -> None:
    expr = substitute(query.expr, observed.variables[query.dashboard])
    result = observed.stack.prometheus.query(expr, at=observed.at)
    if GPU_METRIC in query.expr and not result and not gpu_here():
        pytest.skip(f"{query.ident}: GPU panel; {GPU_METRIC}* series exist only where NVML finds a GPU, none here")
    assert result, f"{query.ident} ({query.title!r}) returned no series:\n{expr}"
    values = [float(row["value"][1]) for row in result]
    assert any(math.isfinite(v) for v in values), f"{query.ident} ({query.title!r}) only NaN/Inf {values}:\n{expr}"


@pytest.mark.slow
def test_in_flight_gauge_follows_requests(observed: Observed) -> None:
    """Requests inside the data plane show on the gauge while they wait; once answered it is back to 0."""
    url = observed.stack.url
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_sending() -> None:
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    body = infer_body(_one_row(i))
                    response = client.post(f"/v2/models/{MODEL}/infer", json=body)
                    assert response.status_code == 200, response.text
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    def in_flight() -> float | None:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return metric(text, "slimserve_inference_requests_in_flight", model=MODEL, version="2")

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:  # each lone request waits 20 ms in the batcher: a scrape meets one there sooner or later
        wait_for(lambda: bool(errors) or (in_flight() or 0) >= 1, timeout=60, interval=0.001)
    finally:
        stop.set()
        sender.join(60)
    assert not errors, errors
    assert in_flight() == 0, "requests answered are still counted in flight"


def _one_row(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 16)).astype(np.float32)
