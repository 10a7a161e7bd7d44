"""The inference hot path: ``POST /v2/models/{m}[/versions/{v}]/infer`` as a plain ASGI handler.

FastAPI's routing (a linear scan over every route), dependency solving and exception and exit-stack
middleware cost about three times what decoding, batching and encoding a small request do. So the
infer requests are answered by :class:`InferFastPath`, which matches the two paths with one regular
expression, checks the key, reads the body, and calls the same :func:`infer_bytes` the FastAPI
routes call (those stay for the OpenAPI schema and answer only when the fast path is not
installed). Errors take the one ``{"error": ...}`` shape. :class:`FastPathAPI` puts it ahead of
all of FastAPI, its outermost error and body-limit middleware included: as a middleware inside
them it still paid ~10% of the event loop's time per request for those layers (py-spy, tiny MLP).

The body is read with the same limits as :func:`service.http.bodies.read_body`: headers checked
first, the running size, and an idle limit on each wait for the next chunk (a client that stops
halfway is answered 400 "stalled" instead of holding its connection forever). That limit is
``asyncio.timeout``, not the ``anyio.fail_after`` the other body readers use: around a receive
that is already ready (0.3 us), anyio's cancel scope cost 20-22 us and asyncio's timer 6-10 us
(timeit under uvloop on the 2-core dev machine), and this runs on every inference request.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI

from service.errors import BadRequest, NotFound, ServiceError, Unavailable
from service.http.auth import KeyRing
from service.http.bodies import check_body_headers, stalled, too_large
from service.jobconfig import check_name
from service.protocol.codec import CodecLimits, decode_request, encode_json, encode_response, parse_header_length
from service.serving.dataplane import DataPlane

_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_MODEL_NAME = 64
_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_WANTED = frozenset((b"authorization", b"content-encoding", b"content-length", b"inference-header-content-length"))


def version_number(text: str | None) -> int | None:
    """A path's version as a number (404 for anything that cannot be one)."""
    if text is None:
        return None
    if not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise NotFound("no such model version")
    return int(text)


def check_model_name(name: str) -> str:
    """``name`` if a model can have it, else 400: the rule uploads apply (:func:`service.jobconfig.check_name`).

    So ``..``, NUL, control characters and look-alike unicode are refused before anything looks the
    name up. It runs on every inference request: about 0.8 us for a typical name (timeit; 0.15 us for
    the length bound alone), cheap enough to need no cache.
    """
    if len(name) > MAX_MODEL_NAME:
        raise BadRequest(f"model: the name is longer than {MAX_MODEL_NAME} characters")
    return check_name(name)


async def infer_bytes(
    plane: DataPlane, limits: CodecLimits, headers: Mapping[str, str], body: bytes, model: str, version: int | None
) -> tuple[bytes, dict[str, str]]:
    """Decode ``body``, run it, encode the answer: (payload, response headers incl. content-type)."""
    header_length = parse_header_length(headers.get("inference-header-content-length"))
    decoded = decode_request(body, header_length=header_length, limits=limits)
    response = await plane.infer(model, version, decoded)
    payload, out_headers = encode_response(response, binary=decoded.wants_binary)
    out_headers.setdefault("content-type", "application/json")
    return payload, out_headers


class _Disconnected(Exception):
    """The client went away before its body arrived: nothing to answer."""


class InferFastPath:
    """ASGI middleware answering the infer paths itself; everything else goes to ``app``."""

    def __init__(
        self, app: ASGIApp, *, plane: DataPlane, keys: KeyRing, limits: CodecLimits, idle_seconds: float
    ) -> None:
        self.app = app
        self._plane = plane
        self._keys = keys
        self._limits = limits
        self._idle_seconds = idle_seconds  #: longest wait for the next chunk of a body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        match = _INFER.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED}
        try:
            self._keys.check(headers.get("authorization"), "infer")
            model = check_model_name(match.group(1))
            version = version_number(match.group(2))
            check_body_headers(headers, self._limits.max_body_bytes)
            body = await self._body(receive)
            payload, out_headers = await infer_bytes(self._plane, self._limits, headers, body, model, version)
            status = 200
        except _Disconnected:
            return
        except ServiceError as exc:
            status, payload, out_headers = exc.status, encode_json({"error": exc.message}), {}
            out_headers["content-type"] = "application/json"
            if isinstance(exc, Unavailable):
                out_headers["retry-after"] = str(exc.retry_after)
        except Exception as exc:  # the same answer FastAPI's catch-all handler gives
            _log.exception("unhandled error: %s", type(exc).__name__)
            status, payload, out_headers = 500, encode_json({"error": "internal error"}), {}
            out_headers["content-type"] = "application/json"
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out_headers.items()]
        raw.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})

    async def _body(self, receive: Receive) -> bytes:
        limit = self._limits.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self._idle_seconds):
                    message = await receive()
            except TimeoutError:
                raise stalled(self._idle_seconds) from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class FastPathAPI(FastAPI):
    """FastAPI whose infer requests, once :meth:`install_fast_path` ran, skip every layer of FastAPI."""

    _entry: ASGIApp | None = None

    def install_fast_path(self, *, plane: DataPlane, keys: KeyRing, limits: CodecLimits, idle_seconds: float) -> None:
        """Answer the infer paths with :class:`InferFastPath`; everything else goes through FastAPI."""
        self._entry = InferFastPath(super().__call__, plane=plane, keys=keys, limits=limits, idle_seconds=idle_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._entry is None:
            await super().__call__(scope, receive, send)
        else:
            await self._entry(scope, receive, send)
