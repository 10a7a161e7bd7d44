"""Request bodies and model names on the infer and feedback routes: the real app (``create_app``) over ASGI.

Each body reader is exercised: the infer fast path (``InferFastPath``), the FastAPI infer route behind it
(``fast_path=False``) and feedback. The one injected fault is a client that stops sending halfway (a body
iterator that waits forever after its first chunk); every call has a 30 s limit, so a reader that waits
forever fails the test instead of hanging it. The idle limit is 0.3 s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.errors import BadRequest
from service.http.infer_path import check_model_name
from service.http.routes_serving import MAX_FEEDBACK_BYTES
from service.settings import Settings

IDLE = 0.3
INFER = "/v2/models/m/infer"
FEEDBACK = "/v1/models/m/feedback"
JSON = {"Content-Type": "application/json"}
INFER_BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}).encode()
#: Names no model can have, percent-encoded as they travel in a path; and names a model can have.
BAD_NAMES = ["%2E%2E", "a..b", "a%00b", "a%01b", "a%5Cb", "m%D0%BEdel", "a%E2%80%8Bb", "%EF%BD%8D", "n" * 65]
GOOD_NAMES = ["m", "digits", "resnet-50_v1.2", "A" * 64]


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FastAPI]:
    """The service's app with the infer fast path and without it (its FastAPI routes answer), no worker."""
    made = {}
    for name, fast_path in (("fast", True), ("routes", False)):
        home = tmp_path_factory.mktemp(f"bodies-{name}")
        made[name] = create_app(Settings(home=home, run_worker=False, upload_idle_seconds=IDLE), fast_path=fast_path)
    return made


def send(app: FastAPI, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request (httpx's ``request`` arguments) to ``app`` in-process, failing after 30 s."""

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            async with asyncio.timeout(30):
                return await client.request(method, path, **kwargs)

    return asyncio.run(run())


async def stalling(first: bytes) -> AsyncIterator[bytes]:
    """A client that sends ``first`` and then nothing, ever (the injected fault)."""
    yield first
    await asyncio.Event().wait()
    yield b""  # never reached


async def in_pieces(body: bytes, pieces: int, pause: float) -> AsyncIterator[bytes]:
    """``body`` in ``pieces`` chunks, ``pause`` s apart (well under the idle limit)."""
    size = -(-len(body) // pieces)
    for start in range(0, len(body), size):
        await asyncio.sleep(pause)
        yield body[start : start + size]


def error_of(response: httpx.Response, status: int) -> str:
    """The one-line error message of a ``status`` answer."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"])


@pytest.mark.parametrize(
    ("app_name", "path", "first"),
    [
        pytest.param("fast", INFER, INFER_BODY[:20], id="infer-fast-path"),
        pytest.param("routes", INFER, INFER_BODY[:20], id="infer-route"),
        pytest.param("routes", "/v2/models/m/versions/1/infer", INFER_BODY[:20], id="infer-version-route"),
        pytest.param("fast", FEEDBACK, b'[{"id": "r1", ', id="feedback"),
    ],
)
def test_a_body_that_stalls_is_400(apps: dict[str, FastAPI], app_name: str, path: str, first: bytes) -> None:
    """A body whose client stops sending after its first chunk is answered 400 "stalled" once it has been idle
    for ``SLIMSERVE_UPLOAD_IDLE_SECONDS``, the answer a stalled upload gets; nothing waits for it forever."""
    response = send(apps[app_name], "POST", path, content=stalling(first), headers=JSON)
    assert "stalled" in error_of(response, 400)


@pytest.mark.parametrize("app_name", ["fast", "routes"])
def test_a_body_sent_in_pieces_within_the_idle_limit_is_read_whole(apps: dict[str, FastAPI], app_name: str) -> None:
    """A body in several chunks, each well within the idle limit (their total is longer than it), is read to
    its end: the limit bounds each pause, not the whole body. Infer: decoded, then 503 (the registry has not
    started: no lifespan here); feedback: parsed, then 404 (no such model)."""
    response = send(apps[app_name], "POST", INFER, content=in_pieces(INFER_BODY, 6, 0.1))
    assert "registry" in error_of(response, 503)
    body = json.dumps([{"id": "r1", "label": 1}]).encode()
    response = send(apps[app_name], "POST", FEEDBACK, content=in_pieces(body, 5, 0.1))
    assert "no such model" in error_of(response, 404)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZip", "identity, gzip"])
def test_a_compressed_feedback_body_is_415(apps: dict[str, FastAPI], encoding: str) -> None:
    """Feedback refuses every Content-Encoding, as the infer and upload routes do (the body is never inflated)."""
    body = json.dumps([{"id": "r1", "label": 1}]).encode()
    headers = {**JSON, "Content-Encoding": encoding}
    response = send(apps["fast"], "POST", FEEDBACK, content=body, headers=headers)
    assert "compressed" in error_of(response, 415)


@pytest.mark.parametrize("path", [FEEDBACK, INFER])
@pytest.mark.parametrize("app_name", ["fast", "routes"])
def test_a_declared_length_over_the_limit_is_413_unread(apps: dict[str, FastAPI], app_name: str, path: str) -> None:
    """A Content-Length over the route's limit is 413 before a byte of the body is read."""
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield b"x"

    limit = MAX_FEEDBACK_BYTES if path == FEEDBACK else 64 << 20
    headers = {**JSON, "Content-Length": str(limit + 1)}
    response = send(apps[app_name], "POST", path, content=body(), headers=headers)
    assert "limit" in error_of(response, 413)
    assert read == [], "the body was read"


def test_a_chunked_feedback_body_over_the_limit_is_413(apps: dict[str, FastAPI]) -> None:
    """Without a Content-Length, feedback counts the body as it arrives and refuses it past 8 MiB."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(MAX_FEEDBACK_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)

    response = send(apps["fast"], "POST", FEEDBACK, content=body(), headers=JSON)
    assert "limit" in error_of(response, 413)


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("app_name", ["fast", "routes"])
def test_a_name_no_model_can_have_is_400_on_every_v2_route(apps: dict[str, FastAPI], app_name: str, name: str) -> None:
    """``..``, NUL, a control character, a backslash, look-alike unicode (Cyrillic, zero-width space, fullwidth)
    and 65 characters: 400 on the six v2 routes, never a lookup (which answered 404 echoing the name)."""
    routes = [
        ("GET", f"/v2/models/{name}"),
        ("GET", f"/v2/models/{name}/ready"),
        ("GET", f"/v2/models/{name}/versions/1"),
        ("GET", f"/v2/models/{name}/versions/1/ready"),
        ("POST", f"/v2/models/{name}/infer"),
        ("POST", f"/v2/models/{name}/versions/1/infer"),
    ]
    for method, path in routes:
        content = INFER_BODY if method == "POST" else None
        response = send(apps[app_name], method, path, content=content)
        message = error_of(response, 400)
        assert "model" in message, (path, message)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_check_model_name_accepts_names_a_model_can_have(name: str) -> None:
    """Names the upload accepts pass unchanged (a known name is then looked up as before)."""
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["..", "a..b", "a\x00b", "a\x01b", "a\\b", "mоdel", "ｍｏｄｅｌ", "a\u202eb", "", "-a", "n" * 65]
)
def test_check_model_name_refuses_what_the_upload_refuses(name: str) -> None:
    """Every name the upload's rule refuses is 400, and the message does not echo it back."""
    with pytest.raises(BadRequest) as raised:
        check_model_name(name)
    if name:
        assert name not in raised.value.message


def test_a_good_name_still_reaches_the_lookup(apps: dict[str, FastAPI]) -> None:
    """A valid name gets past the check to the registry (503: it has not started, there is no lifespan here)."""
    response = send(apps["fast"], "GET", "/v2/models/digits")
    assert "registry" in error_of(response, 503)
