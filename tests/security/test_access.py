"""RELIABILITY.md, section "Access", against real `slimserve serve` processes: what the other suites leave out.

Already proven elsewhere: no key or a wrong key is 401 on every route (tests/e2e/test_api.py for
the /v1 routes, tests/security/test_api_schema.py for every operation of the schema); the infer key
cannot upload, delete or cancel and changes nothing, and can read (test_api.py); ``/docs`` can be
turned off and ``/metrics`` moved to an internal port (test_api.py, tests/e2e/test_serving.py);
an unknown model name makes no metric series (test_serving.py, five names); a retried upload with
the same ``Idempotency-Key`` returns the same job (test_api.py). Added here:

* deploy and rollback with the infer key: 403, nothing changed; the infer key may infer;
* no other path, method or spelling of a write route skips the key check;
* keys are compared in constant time (a code-level check of ``KeyRing``: every configured key is
  compared, as fixed-size digests, with ``hmac.compare_digest``, whatever is presented);
* no request field, header or Triton / TorchServe management route makes the server fetch a URL;
* a flood of made-up model names on every route that takes one makes no new metric series;
* ``/metrics`` can be turned off (and ``/docs`` with it).
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tests.e2e.conftest import (
    MlpFiles,
    assert_error,
    bearer,
    db_rows,
    home_files,
    job_config,
    model_names,
    multipart_body,
    serving,
    upload,
)
from tests.security.support import UrlTrap, home_of, unique
from tests.serverproc import Proc

ADMIN, INFER = "sec-admin-key", "sec-infer-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Admin and infer keys, no worker (uploaded jobs stay queued), metrics and docs on."""
    home = tmp_path_factory.mktemp("access") / "home"
    settings = {"admin_keys": ADMIN, "infer_keys": INFER, "run_worker": "false", "drain_seconds": "0"}
    with serving(home, **settings) as proc:
        proc.extra["home"] = str(home)
        yield proc


def _queued(proc: Proc, mlp_files: MlpFiles, prefix: str) -> tuple[str, str]:
    """An admin upload (its job stays queued: no worker); the model name and job id."""
    name = unique(prefix)
    response = upload(proc.url, mlp_files.model, mlp_files.data, job_config(name), key=ADMIN)
    assert response.status_code == 202, response.text
    return name, str(response.json()["job"]["id"])


def _state(home: Path) -> tuple[Any, ...]:
    """Every model, version and job row that a write could change, plus the files on disk."""
    return (
        db_rows(home, "SELECT name, default_version FROM models ORDER BY name"),
        db_rows(home, "SELECT model_id, number, kind, state FROM versions ORDER BY model_id, number"),
        db_rows(home, "SELECT id, status, cancel_requested FROM jobs ORDER BY id"),
        home_files(home),
    )


# --------------------------------------------------------------------------- scopes


def test_deploy_and_rollback_with_the_infer_key_are_403_and_change_nothing(keyed: Proc, mlp_files: MlpFiles) -> None:
    """Deploy and rollback are writes: the infer key gets 403 (for a real version, and for one that does not exist:
    the scope is checked before anything is looked up), no key or a wrong key 401; not a row or a file changes."""
    home = home_of(keyed)
    name, _job = _queued(keyed, mlp_files, "guarded")
    before = _state(home)
    for path in (f"/v1/models/{name}/versions/1/deploy", f"/v1/models/{name}/versions/9/deploy"):
        assert_error(httpx.post(f"{keyed.url}{path}", headers=bearer(INFER), timeout=30), 403, home)
    assert_error(httpx.post(f"{keyed.url}/v1/models/{name}/rollback", headers=bearer(INFER), timeout=30), 403, home)
    for headers in ({}, bearer("not-a-key"), {"Authorization": f"Basic {INFER}"}):
        for path in (f"/v1/models/{name}/rollback", f"/v1/models/{name}/versions/1/deploy"):
            assert_error(httpx.post(f"{keyed.url}{path}", headers=headers, timeout=30), 401, home)
    assert _state(home) == before, "a refused deploy or rollback changed something"
    model = httpx.get(f"{keyed.url}/v1/models/{name}", headers=bearer(ADMIN), timeout=30)
    assert model.status_code == 200 and model.json()["name"] == name


def test_the_infer_key_may_infer(keyed: Proc) -> None:
    """Inference has its own key: with the infer key (or the admin key) an infer request passes the key check and
    reaches the model lookup (404 here: nothing is served); without a key, or with a wrong one, it is 401."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}).encode()
    for path in ("/v2/models/absent/infer", "/v2/models/absent/versions/1/infer", "/v2/models/absent"):
        method = "POST" if path.endswith("infer") else "GET"
        content = body if method == "POST" else None
        for key in (INFER, ADMIN):
            response = httpx.request(method, f"{keyed.url}{path}", content=content, headers=bearer(key), timeout=30)
            assert_error(response, 404)
        for headers in ({}, bearer("guess")):
            response = httpx.request(method, f"{keyed.url}{path}", content=content, headers=headers, timeout=30)
            assert_error(response, 401)


#: Spellings and methods of the write routes that a router or a middleware might treat differently.
def _alternate_writes(name: str, job_id: str) -> list[tuple[str, str]]:
    return [
        ("POST", "/v1/models/"),
        ("POST", "//v1/models"),
        ("POST", "/v1//models"),
        ("POST", "/v1/models?admin=1"),
        ("POST", "/V1/models"),
        ("PUT", "/v1/models"),
        ("PATCH", f"/v1/models/{name}"),
        ("PUT", f"/v1/models/{name}"),
        ("DELETE", f"/v1/models/{name}/"),
        ("DELETE", f"//v1/models/{name}"),
        ("DELETE", f"/v1/models/{name}?force=1"),
        ("POST", f"/v1/models/{name}/versions/1/deploy/"),
        ("POST", f"/v1/models/{name}/rollback/"),
        ("POST", f"/v1/jobs/{job_id}/cancel/"),
        ("POST", f"//v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/cancel"),
        ("POST", f"/v1/jobs/{job_id.upper()}/cancel"),
        ("OPTIONS", "/v1/models"),
        ("HEAD", "/v1/models"),
        ("POST", f"/v2/models/{name}/infer/"),
        ("POST", f"//v2/models/{name}/infer"),
        ("POST", f"/v2/models/{name}/versions/1/infer/"),
    ]


def test_no_other_path_or_method_skips_the_key_check(keyed: Proc, mlp_files: MlpFiles) -> None:
    """Each write route spelled differently (trailing or doubled slashes, a query, upper case, another method) and
    the infer routes past the fast path's pattern are never a success without the right key, with no key or with
    the infer key; not a row or a file changes and the queued job stays queued.

    CVE-2026-24207 and CVE-2026-24206 (Triton: authentication bypass "using an alternate path or channel", CWE-288):
    every path to a write goes through the same key check.
    """
    home = home_of(keyed)
    name, job_id = _queued(keyed, mlp_files, "alt")
    before = _state(home)
    boundary = "alt-boundary"
    body = multipart_body(
        [
            ("config", None, json.dumps(job_config(unique("alt-new"))).encode()),
            ("model", "m.onnx", mlp_files.model.read_bytes()),
            ("data", "d.npz", mlp_files.data.read_bytes()),
        ],
        boundary,
    )
    content_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    for method, path in _alternate_writes(name, job_id):
        for headers in ({}, bearer(INFER)):
            content = body if method in ("POST", "PUT", "PATCH") else None
            response = httpx.request(
                method, f"{keyed.url}{path}", content=content, headers={**content_type, **headers}, timeout=30
            )
            assert not 200 <= response.status_code < 300, (method, path, headers, response.status_code, response.text)
            assert _state(home) == before, f"{method} {path} changed something"
    job = httpx.get(f"{keyed.url}/v1/jobs/{job_id}", headers=bearer(ADMIN), timeout=30).json()
    assert job["status"] == "queued" and not job["cancel_requested"], job


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code-level: ``KeyRing`` compares a presented key with every configured key, admin and infer, as SHA-256
    digests of one fixed size, through ``hmac.compare_digest``, and never stops at the first match: the number and
    size of comparisons is the same for a wrong key, a long or short one, and each right one. No ``==`` or ``in``
    touches a key or a digest anywhere in ``service/http/auth.py``."""
    from service.http import auth

    calls: list[tuple[int, int]] = []
    admin = [SecretStr(f"admin-{i}") for i in range(3)]
    infer = [SecretStr(f"infer-{i}") for i in range(2)]
    ring = auth.KeyRing(admin, infer)
    real = auth.hmac
    monkeypatch.setattr(auth, "hmac", SimpleNamespace(compare_digest=lambda a, b: _count(calls, real, a, b)))
    expected = {"admin-0": {"admin", "infer"}, "admin-2": {"admin", "infer"}, "infer-1": {"infer"}}
    for presented in ("admin-0", "admin-2", "infer-1", "", "x", "admin-", "admin-00", "y" * 10_000):
        calls.clear()
        assert ring.scopes(presented) == expected.get(presented, set())
        assert calls == [(32, 32)] * 5, (presented, calls)

    tree = ast.parse(inspect.getsource(auth))
    secret_names = {"digest", "known", "token", "presented", "header", "_admin", "_infer", "key", "value"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq | ast.In) for op in node.ops):
            operands = [node.left, *node.comparators]
            names = {getattr(o, "id", None) or getattr(o, "attr", None) for o in operands}
            assert not names & secret_names, f"auth.py compares a secret with ==/in: {ast.unparse(node)}"


def _count(calls: list[tuple[int, int]], real: Any, a: bytes, b: bytes) -> bool:
    """``real.compare_digest(a, b)``, recording the operands' sizes in ``calls``."""
    calls.append((len(a), len(b)))
    return bool(real.compare_digest(a, b))


# --------------------------------------------------------------------------- no fetch


def _ssrf_requests(url: str, trap: str, mlp_files: MlpFiles) -> list[tuple[str, httpx.Response]]:
    """Requests that each carry the trap's URL in some field; (label, response)."""
    admin = bearer(ADMIN)
    model, data = mlp_files.model, mlp_files.data
    out: list[tuple[str, httpx.Response]] = []

    def add(label: str, response: httpx.Response) -> None:
        out.append((label, response))

    add("config name", upload(url, model, data, {"name": f"{trap}/m"}, key=ADMIN))
    add("config model_url", upload(url, model, data, job_config(unique("u"), model_url=f"{trap}/m.onnx"), key=ADMIN))
    add("config data_url", upload(url, model, data, job_config(unique("u"), data_url=f"{trap}/d.npz"), key=ADMIN))
    add("config callback", upload(url, model, data, job_config(unique("u"), callback_url=trap), key=ADMIN))
    add("config techniques", upload(url, model, data, job_config(unique("u"), techniques=[trap]), key=ADMIN))
    add("config metric", upload(url, model, data, job_config(unique("u"), metric=trap), key=ADMIN))
    add("model part is a URL", upload(url, f"{trap}/m.onnx".encode(), data, job_config(unique("u")), key=ADMIN))
    add("data part is a URL", upload(url, model, f"{trap}/d.npz".encode(), job_config(unique("u")), key=ADMIN))
    add("file name is a URL", upload(url, model, data, job_config(unique("u")), key=ADMIN, model_filename=trap))
    add(
        "idempotency key is a URL",
        upload(url, model, data, job_config(unique("u")), key=ADMIN, idempotency_key=f"{trap}/k"),
    )
    forwarded = {"X-Forwarded-Host": trap, "Forwarded": f"host={trap}", "Referer": trap, "X-Original-URL": trap}
    files = {"model": ("m.onnx", model.read_bytes()), "data": ("d.npz", data.read_bytes())}
    form = {"config": json.dumps(job_config(unique("u")))}
    add(
        "proxy headers",
        httpx.post(f"{url}/v1/models", files=files, data=form, headers={**admin, **forwarded}, timeout=60),
    )
    infer = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0], "parameters": {"url": trap}}],
        "parameters": {"url": trap, "callback": trap},
        "outputs": [{"name": "logits", "parameters": {"url": trap}}],
    }
    add("infer parameters", httpx.post(f"{url}/v2/models/absent/infer", json=infer, headers=admin, timeout=30))
    add(
        "feedback ids",
        httpx.post(f"{url}/v1/models/absent/feedback", json=[{"id": trap, "label": trap}], headers=admin, timeout=30),
    )
    management = [
        ("POST", "/v2/repository/models/absent/load", {"parameters": {"config": json.dumps({"url": trap})}}),
        ("POST", "/v2/repository/index", {"url": trap}),
        ("POST", "/v2/systemsharedmemory/region/r/register", {"key": trap, "offset": 0, "byte_size": 8}),
        ("POST", "/v2/cudasharedmemory/region/r/register", {"raw_handle": {"b64": trap}, "byte_size": 8}),
        ("POST", "/v2/logging", {"log_file": trap}),
        ("POST", "/v2/trace/setting", {"trace_file": trap}),
        ("POST", f"/models?url={trap}/m.mar", None),
        ("POST", f"/workflows?url={trap}/w.war", None),
        ("GET", f"/v1/models/absent/versions/1/model.onnx?url={trap}", None),
    ]
    for method, path, payload in management:
        add(f"{method} {path}", httpx.request(method, f"{url}{path}", json=payload, headers=admin, timeout=30))
    return out


def test_no_request_field_makes_the_server_fetch_a_url(keyed: Proc, mlp_files: MlpFiles) -> None:
    """A URL (a listener that counts connections) put in every place a client controls: the config's name, unknown
    ``*_url`` keys, techniques and metric; the model and data parts and a file name; the Idempotency-Key; proxy
    headers; infer and output parameters; feedback ids and labels; Triton's repository, shared-memory, logging and
    trace APIs and TorchServe's register-by-URL routes (all absent: 404 or 405). Each answer is a clean refusal or a
    plain 202 for what is valid, and nothing ever connects to the URL.

    CVE-2023-43654 (TorchServe: the management API registered models from any URL, server-side request forgery)
    and CVE-2025-23319 / CVE-2025-23320 (Triton: the shared-memory registration API, fed an internal region's name
    leaked in an error, gave read/write access to another process's memory): none of these APIs exist here.
    """
    with UrlTrap() as trap:
        answers = _ssrf_requests(keyed.url, trap.url, mlp_files)
        assert httpx.get(f"{keyed.url}/v1/models", headers=bearer(ADMIN), timeout=30).status_code == 200
        connections = trap.connections
    for label, response in answers:
        if response.status_code == 202:
            continue
        assert 400 <= response.status_code < 500, (label, response.status_code, response.text)
        assert_error(response, response.status_code, home_of(keyed))
    accepted = {label for label, response in answers if response.status_code == 202}
    assert accepted <= {"config metric", "file name is a URL", "idempotency key is a URL", "proxy headers"}, accepted
    assert connections == 0, f"the server connected to a URL a client sent ({connections} connections)"


# --------------------------------------------------------------------------- metrics


def _series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (sample name, labels) pair of an exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _flood(url: str, names: list[str]) -> None:
    """Ask for each made-up model on every route that takes a model name (with the infer key)."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]})
    with httpx.Client(base_url=url, headers=bearer(INFER), timeout=30) as client:
        for name in names:
            for version in (None, "1", "999999999"):
                at = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
                assert client.post(f"{at}/infer", content=body).status_code == 404
                assert client.get(at).status_code == 404
                assert client.get(f"{at}/ready").status_code == 404
            assert client.get(f"/v1/models/{name}").status_code == 404
            assert client.get(f"/v1/models/{name}/versions/1/report.json").status_code == 404
            assert client.post(f"/v1/models/{name}/feedback", json=[{"id": "a", "label": 1}]).status_code == 404


@pytest.mark.slow
def test_a_flood_of_model_names_makes_no_metric_series(keyed: Proc) -> None:
    """Two floods of 30 made-up model names each (64 characters, the longest allowed), on every route that takes a
    name: after the first flood, the second adds no series at all, and no made-up name appears in ``/metrics``:
    the series count is bounded by the registered models, not by what clients ask for. (test_serving.py does five
    names on three routes of a served model.)"""

    def scrape() -> str:
        response = httpx.get(f"{keyed.url}/metrics", timeout=30)
        assert response.status_code == 200
        return response.text

    first = [f"flood-a-{i:03d}-" + "x" * 52 for i in range(30)]
    second = [f"flood-b-{i:03d}-" + "y" * 52 for i in range(30)]
    _flood(keyed.url, first)
    after_first = scrape()
    _flood(keyed.url, second)
    after_second = scrape()
    assert _series(after_second) == _series(after_first), sorted(_series(after_second) - _series(after_first))[:5]
    for name in (*first, *second):
        assert name not in after_second, f"a series names the made-up model {name}"


@pytest.fixture
def closed(tmp_path: Path) -> Iterator[Proc]:
    """A server with ``/metrics`` and ``/docs`` turned off (an admin key, no worker)."""
    home = tmp_path / "home"
    settings = {"admin_keys": ADMIN, "run_worker": "false", "drain_seconds": "0"}
    with serving(home, **settings, metrics_enabled="false", docs_enabled="false") as proc:
        proc.extra["home"] = str(home)
        yield proc


@pytest.mark.slow
def test_metrics_and_docs_can_be_turned_off(closed: Proc, mlp_files: MlpFiles) -> None:
    """``SLIMSERVE_METRICS_ENABLED=false``: ``/metrics`` answers 404 with the error shape, with or without a key (and
    ``/docs``, ``/openapi.json`` too); the API itself works."""
    for path in ("/metrics", "/docs", "/openapi.json"):
        for headers in ({}, bearer(ADMIN)):
            assert_error(httpx.get(f"{closed.url}{path}", headers=headers, timeout=30), 404)
    assert httpx.get(f"{closed.url}/v1/health", timeout=30).json() == {"status": "ok"}
    response = upload(closed.url, mlp_files.model, mlp_files.data, job_config(unique("closed")), key=ADMIN)
    assert response.status_code == 202, response.text
    assert model_names(home_of(closed)) == {response.json()["model"]["name"]}
