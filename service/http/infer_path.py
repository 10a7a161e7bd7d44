"""The inference hot path: ``POST /v2/models/{m}[/versions/{v}]/infer`` as a plain ASGI handler.

FastAPI's routing (a linear scan over every route), dependency solving and exception and exit-stack
middleware cost about three times what decoding, batching and encoding a small request do. So the
infer requests are answered by :class:`InferFastPath`, a middleware in front of the router that
matches the two paths with one regular expression, checks the key, reads the body, and calls the
same :func:`infer_bytes` the FastAPI routes call (those stay for the OpenAPI schema and answer
only when the middleware is not installed). Errors take the one ``{"error": ...}`` shape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from service.errors import BadRequest, NotFound, ServiceError, TooLarge, Unavailable, UnsupportedFormat
from service.http.auth import KeyRing
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
    """400 for a name longer than any model can have (the upload checks the same bound)."""
    if len(name) > MAX_MODEL_NAME:
        raise BadRequest(f"model: the name is longer than {MAX_MODEL_NAME} characters")
    return name


def check_body_headers(headers: Mapping[str, str], limits: CodecLimits) -> None:
    """415 for a compressed body, 413 for a declared length over the limit (before reading it)."""
    if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise UnsupportedFormat("compressed request bodies are not accepted")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise TooLarge(f"the request body is larger than the limit of {limits.max_body_bytes} bytes")


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

    def __init__(self, app: ASGIApp, *, plane: DataPlane, keys: KeyRing, limits: CodecLimits) -> None:
        self.app = app
        self._plane = plane
        self._keys = keys
        self._limits = limits

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
            check_body_headers(headers, self._limits)
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
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
