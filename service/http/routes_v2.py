"""KServe v2 (Open Inference Protocol) over HTTP: health, metadata, inference (JSON and binary tensors).

FastAPI's request validation is bypassed on ``infer``: the body is read raw and decoded by
``service.protocol.codec`` (orjson; the binary tensor extension), so malformed input is always a
400 with ``{"error": ...}`` and the hot path builds no pydantic models.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from service.errors import NotFound, TooLarge, UnsupportedFormat
from service.http.auth import require
from service.protocol.codec import CodecLimits, decode_request, encode_json, encode_response, parse_header_length
from service.serving.dataplane import DataPlane

router = APIRouter(prefix="/v2", tags=["inference (KServe v2)"])

ModelName = Annotated[str, Path(max_length=64)]
Version = Annotated[str, Path(max_length=12)]
_JSON = "application/json"


def plane(request: Request) -> DataPlane:
    """The data plane the composition root put on the app."""
    data: DataPlane = request.app.state.dataplane
    return data


def version_number(text: str | None) -> int | None:
    """A path's version as a number (404 for anything that cannot be one)."""
    if text is None:
        return None
    if not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise NotFound("no such model version")
    return int(text)


def _json(body: object, status: int = 200) -> Response:
    return Response(encode_json(body), status_code=status, media_type=_JSON)


@router.get("/health/live", summary="Liveness")
async def live(request: Request) -> Response:
    return _json({"live": plane(request).live()})


@router.get("/health/ready", summary="Readiness: every deployed model loaded, not shutting down")
async def ready(request: Request) -> Response:
    is_ready = plane(request).ready()
    return _json({"ready": is_ready}, 200 if is_ready else 503)


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return _json(plane(request).server_metadata())


@router.get("/models/{model}", dependencies=[Depends(require("infer"))], summary="Model metadata")
async def model_metadata(request: Request, model: ModelName) -> Response:
    return _json(plane(request).model_metadata(model, None))


@router.get("/models/{model}/versions/{version}", dependencies=[Depends(require("infer"))])
async def version_metadata(request: Request, model: ModelName, version: Version) -> Response:
    return _json(plane(request).model_metadata(model, version_number(version)))


@router.get("/models/{model}/ready", dependencies=[Depends(require("infer"))])
async def model_ready(request: Request, model: ModelName) -> Response:
    is_ready = plane(request).model_ready(model, None)
    return _json({"name": model, "ready": is_ready}, 200 if is_ready else 503)


@router.get("/models/{model}/versions/{version}/ready", dependencies=[Depends(require("infer"))])
async def version_ready(request: Request, model: ModelName, version: Version) -> Response:
    is_ready = plane(request).model_ready(model, version_number(version))
    return _json({"name": model, "version": version, "ready": is_ready}, 200 if is_ready else 503)


@router.post("/models/{model}/infer", dependencies=[Depends(require("infer"))], summary="Inference")
async def infer(request: Request, model: ModelName) -> Response:
    return await _infer(request, model, None)


@router.post("/models/{model}/versions/{version}/infer", dependencies=[Depends(require("infer"))])
async def infer_version(request: Request, model: ModelName, version: Version) -> Response:
    return await _infer(request, model, version_number(version))


async def _infer(request: Request, model: str, version: int | None) -> Response:
    limits: CodecLimits = request.app.state.codec_limits
    if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise UnsupportedFormat("compressed request bodies are not accepted")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise TooLarge(f"the request body is larger than the limit of {limits.max_body_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise TooLarge(f"the request body is larger than the limit of {limits.max_body_bytes} bytes")
    header_length = parse_header_length(request.headers.get("inference-header-content-length"))
    decoded = decode_request(bytes(body), header_length=header_length, limits=limits)
    response = await plane(request).infer(model, version, decoded)
    payload, headers = encode_response(response, binary=decoded.wants_binary)
    return Response(payload, headers=headers, media_type=headers.pop("content-type", _JSON))
