"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) against a real `slimserve serve`.

One server for the module (``api``): an admin key set, the tiny MLP uploaded as ``MODEL`` and its
job succeeded, so the v2 routes have a real, loaded model. The schema is read from the running
server's ``/openapi.json`` and every operation in it is fuzzed with schemathesis' generated
positive (schema-valid) and negative (schema-violating) cases, each sent over real HTTP with the
admin key. Operations with a model in their path run twice: once with generated names (mostly
unknown models) and once aimed at ``MODEL``, so the code behind a found model is fuzzed too.

Checks on every response (schemathesis built-ins, plus ours):
``not_a_server_error`` (no 5xx but a documented 503), ``status_code_conformance`` (the status is
documented), ``content_type_conformance``, ``response_schema_conformance``,
``response_headers_conformance``, ``negative_data_rejection`` (an invalid request is a 4xx) and
``ignored_auth`` (on a success, the same request without a key or with a wrong one is refused);
ours: every 4xx body is ``{"error": "<one line>"}`` with no file path or traceback in it.
Not used, on purpose: ``positive_data_acceptance`` (a schema-valid request for an unknown model,
job or tensor name is rightly a 404 or 400), ``max_response_time`` (no timed assertions; a hang
is caught by the request timeout instead), and the stateful checks (``use_after_free``,
``ensure_resource_availability``: they need schemathesis' stateful phase, which this module does
not run). Generation options: no extra, undeclared query parameters in negative cases (the service
ignores unknown query parameters, as HTTP APIs do), and no generated ``Authorization`` header (each
test sends the key itself; ``test_without_key_is_401`` and ``ignored_auth`` cover no key and a wrong one).

Bounded for CI: ``derandomize=True`` (the same cases on every run, so CI is reproducible), no
example database, ``MAX_EXAMPLES`` per operation and mode, an explicit timeout on every request.
State: ``DELETE /v1/models/{name}`` never gets ``MODEL`` (a filter on the generated case), and the
deploy / rollback cases aimed at ``MODEL`` only switch between its two ready versions, which both
serve. The last test proves the server survived all of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.builders import mlp_data, mlp_onnx
from tests.e2e.conftest import _LEAKS, _PATH, bearer, job_config, settings_env, upload
from tests.serverproc import Proc, start_server, wait_for, wait_job

pytestmark = pytest.mark.slow

ADMIN = "fuzz-admin-key"
#: The served model: a name the generators are unlikely to produce by chance (DELETE filters it anyway).
MODEL = "served-mlp"
#: Cases per operation and mode: the whole module stays under ~90 s on two shared cores.
MAX_EXAMPLES = 10
#: Seconds any one request may take; more is a hang, and a failure.
REQUEST_TIMEOUT = 15.0

#: Every operation of the schema: a new route must be added here (test_schema_lists_every_operation) to be fuzzed.
OPERATIONS = (
    "GET /v1/health",
    "POST /v1/models",
    "GET /v1/models",
    "GET /v1/models/{name}",
    "GET /v1/models/{name}/versions/{number}",
    "GET /v1/models/{name}/versions/{number}/{filename}",
    "GET /v1/jobs/{job_id}",
    "POST /v1/jobs/{job_id}/cancel",
    "POST /v1/models/{name}/versions/{number}/deploy",
    "POST /v1/models/{name}/rollback",
    "POST /v1/models/{name}/feedback",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2",
    "GET /v2/models/{model}",
    "GET /v2/models/{model}/versions/{version}",
    "GET /v2/models/{model}/ready",
    "GET /v2/models/{model}/versions/{version}/ready",
    "POST /v2/models/{model}/infer",
    "POST /v2/models/{model}/versions/{version}/infer",
    # Last: it destroys what it finds (never MODEL, see _keeps_model).
    "DELETE /v1/models/{name}",
)
_MODEL_PARAMS = ("name", "model")
#: Operations without parameters or body: nothing to make invalid, so no negative mode.
NO_INPUT = frozenset({"GET /v1/health", "GET /v1/models", "GET /v2/health/live", "GET /v2/health/ready", "GET /v2"})
#: Operations with a body: a pinned model name still leaves the body to make invalid.
WITH_BODY = frozenset(
    {
        "POST /v1/models",
        "POST /v1/models/{name}/feedback",
        "POST /v2/models/{model}/infer",
        "POST /v2/models/{model}/versions/{version}/infer",
    }
)
_MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def _negatable(op: str, pinned: bool) -> bool:
    """Whether a negative case can exist: some input is left once the model name is pinned."""
    if op in NO_INPUT:
        return False
    return not pinned or op.count("{") > 1 or op in WITH_BODY


#: (operation, whether its model path parameter is pinned to MODEL, mode); DELETE last.
TARGETS = [
    (op, pinned, mode)
    for pinned in (False, True)
    for op in OPERATIONS
    for mode in _MODES
    if mode is GenerationMode.POSITIVE or _negatable(op, pinned)
    if not pinned or (any("{" + p + "}" in op for p in _MODEL_PARAMS) and not op.startswith("DELETE"))
]
TARGETS.sort(key=lambda target: target[0].startswith("DELETE"))  # stable: DELETE stays last

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    ignored_auth,
]
#: derandomize: CI must see the same cases every run; database=None: nothing is replayed from earlier runs.
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@dataclass
class Api:
    """The module's server and its schema, as schemathesis loaded it from ``/openapi.json``."""

    proc: Proc
    schema: Any
    session: requests.Session

    @property
    def url(self) -> str:
        return self.proc.url


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A keyed server with ``MODEL`` uploaded, optimized, deployed and loaded; its schema."""
    folder = tmp_path_factory.mktemp("fuzz-api")
    home = folder / "home"
    settings_ = settings_env(
        admin_keys=ADMIN, poll_seconds="0.2", registry_poll_seconds="0.2", drain_seconds="0", docs_enabled="true"
    )
    proc = start_server(home, env=settings_)
    try:
        model, data = mlp_onnx(folder / "mlp.onnx"), mlp_data(folder / "mlp.npz")
        submitted = upload(proc.url, model, data, job_config(MODEL), key=ADMIN)
        assert submitted.status_code == 202, submitted.text
        job = wait_job(proc.url, submitted.json()["job"]["id"], headers=bearer(ADMIN))
        assert job["status"] == "succeeded", job
        wait_for(lambda: _ready(proc.url), timeout=60)
        schema = schemathesis.openapi.from_url(f"{proc.url}/openapi.json", timeout=REQUEST_TIMEOUT)
        # Unknown query parameters are ignored, as HTTP APIs do: not a violation to reject. The key is
        # supplied by each test (with it, without it, or a wrong one), not generated from the scheme.
        schema.config.generation.update(
            allow_extra_parameters=False, with_security_parameters=False, deterministic=True
        )
        with requests.Session() as session:
            yield Api(proc, schema, session)
    finally:
        proc.stop(timeout=40)
        print(f"--- server log ({proc.log.name}) ---\n{proc.output()[-4000:]}")


def _ready(url: str) -> bool:
    response = httpx.get(f"{url}/v2/models/{MODEL}/ready", headers=bearer(ADMIN), timeout=REQUEST_TIMEOUT)
    return response.status_code == 200


def _operation(api: Api, label: str) -> Any:
    method, path = label.split(" ", 1)
    return api.schema[path][method]


def _keeps_model(case: Any) -> bool:
    """Whether a case leaves ``MODEL`` alone (DELETE cases naming it are not sent)."""
    return case.method.upper() != "DELETE" or (case.path_parameters or {}).get("name") != MODEL


def assert_clean_error(status: int, content_type: str, content: bytes) -> None:
    """A 4xx is ``{"error": "<one line>"}`` and shows no file path, traceback or internals."""
    if not 400 <= status < 500:
        return
    assert content_type.startswith("application/json"), (status, content_type, content[:200])
    body = json.loads(content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message.strip() and "\n" not in message, body
    leaks = [leak for leak in _LEAKS if leak in message]
    assert not leaks, f"error message leaks {leaks}: {message}"
    assert not _PATH.search(message), f"error message shows a file path: {message}"


def _fuzz(api: Api, label: str, mode: GenerationMode, pinned: bool) -> None:
    operation = _operation(api, label)
    names = [p for p in _MODEL_PARAMS if "{" + p + "}" in label] if pinned else []
    strategy = operation.as_strategy(generation_mode=mode, path_parameters={p: MODEL for p in names} or None)

    @FUZZ
    @given(case=strategy.filter(_keeps_model))
    def run(case: Any) -> None:
        response = case.call_and_validate(
            base_url=api.url,
            session=api.session,
            headers=bearer(ADMIN),
            checks=CHECKS,
            timeout=REQUEST_TIMEOUT,
        )
        assert_clean_error(response.status_code, ",".join(response.headers.get("content-type", [])), response.content)

    run()


# --------------------------------------------------------------------------- tests


def test_schema_lists_every_operation(api: Api) -> None:
    """The live schema has exactly the operations this module fuzzes, each v1/v2 write or model route
    declares the bearer scheme, and no operation documents FastAPI's 422 (the service answers 400)."""
    raw = api.schema.raw_schema
    found = {f"{method.upper()} {path}" for path, item in raw["paths"].items() for method in item}
    assert found == set(OPERATIONS)
    assert raw["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key: Authorization: Bearer <key>",
    }
    public = {"GET /v1/health", "GET /v2/health/live", "GET /v2/health/ready", "GET /v2"}
    for path, item in raw["paths"].items():
        for method, operation in item.items():
            label = f"{method.upper()} {path}"
            assert "422" not in operation["responses"], label
            assert (operation.get("security") == [{"bearer": []}]) == (label not in public), label
            has_input = bool(operation.get("parameters")) or "requestBody" in operation
            assert has_input == (label not in NO_INPUT), label
            assert ("requestBody" in operation) == (label in WITH_BODY), label
            if path.startswith("/v2/models/"):  # the v2 model routes document every refusal they give
                assert {"400", "401", "403", "404", "503"} <= set(operation["responses"]), label


@pytest.mark.parametrize(
    ("label", "pinned", "mode"), TARGETS, ids=[f"{op}{' @model' if p else ''}-{m.value}" for op, p, m in TARGETS]
)
def test_fuzz_operation(api: Api, label: str, pinned: bool, mode: GenerationMode) -> None:
    """Generated valid and invalid requests to one operation, with the admin key: never a 5xx (bar a
    documented 503), always a documented status, content type and body shape; every refusal is a clean
    ``{"error": ...}``; on a success, the same request without the key or with a wrong one is refused."""
    _fuzz(api, label, mode, pinned)


_AUTHED = [op for op in OPERATIONS if op not in {"GET /v1/health", "GET /v2/health/live", "GET /v2/health/ready"}]
_AUTHED.remove("GET /v2")


@pytest.mark.parametrize("label", _AUTHED)
def test_without_key_is_401(api: Api, label: str) -> None:
    """Generated requests (valid and invalid) to an operation that needs a key, sent without one: 401
    with a clean ``{"error": ...}``, whatever else is wrong with them, never a 5xx and never a success.
    The one exception: a path value with a ``/`` in it reaches no route at all (the router's 404)."""
    operation = _operation(api, label)
    strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | operation.as_strategy(
        generation_mode=GenerationMode.NEGATIVE
    )

    @FUZZ
    @given(case=strategy)
    def run(case: Any) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        response = case.call(base_url=api.url, session=api.session, timeout=REQUEST_TIMEOUT)
        assert_clean_error(response.status_code, ",".join(response.headers.get("content-type", [])), response.content)
        routed = not any("/" in str(value) for value in (case.path_parameters or {}).values())
        if routed:
            assert response.status_code == 401, (response.status_code, response.text, case.path_parameters)
        else:
            assert response.status_code in (401, 404), (response.status_code, response.text)

    run()


def test_feedback_checks_key_before_body(api: Api) -> None:
    """Found by the fuzzer: ``POST /v1/models/{name}/feedback`` with a malformed body and no key was
    answered 400 (FastAPI parsed the body before the key dependency ran), telling an unauthenticated
    client about its body. Now 401 without a key whatever the body; with the key, the same bodies are
    400 with a clean error, and a good one is counted."""
    url = f"{api.url}/v1/models/{MODEL}/feedback"
    bad_bodies = [b"{", b"", b'{"id": "a"}', b"[1, 2]", b"[" + b",".join([b"{}"] * 10_001) + b"]"]
    for body in bad_bodies:
        anonymous = httpx.post(url, content=body, timeout=REQUEST_TIMEOUT)
        assert anonymous.status_code == 401, (body[:20], anonymous.text)
        assert_clean_error(401, anonymous.headers["content-type"], anonymous.content)
        keyed = httpx.post(url, content=body, headers=bearer(ADMIN), timeout=REQUEST_TIMEOUT)
        assert keyed.status_code == 400, (body[:20], keyed.text)
        assert_clean_error(400, keyed.headers["content-type"], keyed.content)
    good = httpx.post(url, json=[{"id": "never-seen", "label": 1}], headers=bearer(ADMIN), timeout=REQUEST_TIMEOUT)
    assert good.status_code == 200, good.text
    assert good.json() == {"correct": 0, "incorrect": 0, "unknown": 1}


def test_server_survived(api: Api) -> None:
    """After all the fuzzing the same process is alive, live, ready, still serves ``MODEL`` correctly
    shaped answers, and never logged an unhandled error (every 500 logs one)."""
    assert api.proc.popen.poll() is None, api.proc.output()[-3000:]
    live = httpx.get(f"{api.url}/v2/health/live", timeout=REQUEST_TIMEOUT)
    assert live.status_code == 200 and live.json() == {"live": True}
    wait_for(lambda: _ready(api.url), timeout=30)
    body = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [0.5] * 32}]}
    response = httpx.post(
        f"{api.url}/v2/models/{MODEL}/infer", json=body, headers=bearer(ADMIN), timeout=REQUEST_TIMEOUT
    )
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [(o["name"], o["shape"]) for o in outputs] == [("logits", [2, 4])]
    log = api.proc.output()
    assert "unhandled error" not in log, re.findall(r".*unhandled error.*", log)[:5]
