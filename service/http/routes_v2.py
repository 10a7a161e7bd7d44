"""KServe v2 (Open Inference Protocol) over HTTP: health, metadata, inference (JSON and binary tensors).

The infer routes here describe the endpoints in the OpenAPI schema; in the running service
``service.http.infer_path.InferFastPath`` answers them ahead of FastAPI's router, through the same
``infer_bytes``. Either way the body is read raw and decoded by ``service.protocol.codec`` (orjson;
the binary tensor extension), so malformed input is always a 400 with ``{"error": ...}``. Every route
that takes a model name checks it first (:func:`~service.http.infer_path.check_model_name`: 400 for a
name no model can have, never a lookup that echoes it in a 404).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from service.http.auth import require
from service.http.bodies import read_body
from service.http.infer_path import check_model_name, infer_bytes, version_number
from service.http.schemas import (
    ErrorOut,
    InferResponseOut,
    LiveOut,
    ModelMetadataOut,
    ModelReadyOut,
    ReadyOut,
    ServerMetadataOut,
)
from service.protocol.codec import CodecLimits, encode_json
from service.serving.dataplane import DataPlane

router = APIRouter(prefix="/v2", tags=["inference (KServe v2)"])

ModelName = Annotated[str, Path(max_length=64)]
Version = Annotated[str, Path(max_length=12)]
_JSON = "application/json"

Responses = dict[int | str, dict[str, Any]]


def _errors(*codes: int) -> Responses:
    return {code: {"model": ErrorOut} for code in codes}


#: What a v2 model route answers besides 200: a bad name (400), no or a wrong key (401, 403), an unknown
#: model or version (404), a version not loaded yet or a server draining (503).
_MODEL_ERRORS = _errors(400, 401, 403, 404, 503)
_INFER_RESPONSES: Responses = {
    **_errors(400, 401, 403, 404, 413, 415, 503),
    200: {
        "model": InferResponseOut,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON, or with binary outputs the JSON header then the blobs (Inference-Header-Content-Length)",
    },
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            _JSON: {"schema": {"$ref": "#/components/schemas/InferRequestIn"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: the JSON header (Inference-Header-Content-Length), then blobs",
            },
        },
    }
}


def plane(request: Request) -> DataPlane:
    """The data plane the composition root put on the app."""
    data: DataPlane = request.app.state.dataplane
    return data


def _json(body: object, status: int = 200) -> Response:
    return Response(encode_json(body), status_code=status, media_type=_JSON)


@router.get("/health/live", summary="Liveness", responses={200: {"model": LiveOut}})
async def live(request: Request) -> Response:
    return _json({"live": plane(request).live()})


@router.get(
    "/health/ready",
    summary="Readiness: every deployed model loaded, not shutting down",
    responses={200: {"model": ReadyOut}, 503: {"model": ReadyOut, "description": "not ready"}},
)
async def ready(request: Request) -> Response:
    is_ready = plane(request).ready()
    return _json({"ready": is_ready}, 200 if is_ready else 503)


@router.get("", summary="Server metadata", responses={200: {"model": ServerMetadataOut}})
async def server_metadata(request: Request) -> Response:
    return _json(plane(request).server_metadata())


@router.get(
    "/models/{model}",
    dependencies=[Depends(require("infer"))],
    summary="Model metadata",
    responses={**_MODEL_ERRORS, 200: {"model": ModelMetadataOut}},
)
async def model_metadata(request: Request, model: ModelName) -> Response:
    return _json(plane(request).model_metadata(check_model_name(model), None))


@router.get(
    "/models/{model}/versions/{version}",
    dependencies=[Depends(require("infer"))],
    summary="Model version metadata",
    responses={**_MODEL_ERRORS, 200: {"model": ModelMetadataOut}},
)
async def version_metadata(request: Request, model: ModelName, version: Version) -> Response:
    return _json(plane(request).model_metadata(check_model_name(model), version_number(version)))


@router.get(
    "/models/{model}/ready",
    dependencies=[Depends(require("infer"))],
    summary="Model readiness",
    responses={**_MODEL_ERRORS, 200: {"model": ModelReadyOut}, 503: {"model": ModelReadyOut | ErrorOut}},
)
async def model_ready(request: Request, model: ModelName) -> Response:
    is_ready = plane(request).model_ready(check_model_name(model), None)
    return _json({"name": model, "ready": is_ready}, 200 if is_ready else 503)


@router.get(
    "/models/{model}/versions/{version}/ready",
    dependencies=[Depends(require("infer"))],
    summary="Model version readiness",
    responses={**_MODEL_ERRORS, 200: {"model": ModelReadyOut}, 503: {"model": ModelReadyOut | ErrorOut}},
)
async def version_ready(request: Request, model: ModelName, version: Version) -> Response:
    is_ready = plane(request).model_ready(check_model_name(model), version_number(version))
    return _json({"name": model, "version": version, "ready": is_ready}, 200 if is_ready else 503)


@router.post(
    "/models/{model}/infer",
    dependencies=[Depends(require("infer"))],
    summary="Inference",
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_BODY,
)
async def infer(request: Request, model: ModelName) -> Response:
    return await _infer(request, check_model_name(model), None)


@router.post(
    "/models/{model}/versions/{version}/infer",
    dependencies=[Depends(require("infer"))],
    summary="Inference on one version",
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_BODY,
)
async def infer_version(request: Request, model: ModelName, version: Version) -> Response:
    return await _infer(request, check_model_name(model), version_number(version))


async def _infer(request: Request, model: str, version: int | None) -> Response:
    """Reached only without the :class:`~service.http.infer_path.InferFastPath` middleware."""
    limits: CodecLimits = request.app.state.codec_limits
    idle_seconds: float = request.app.state.settings.upload_idle_seconds
    body = await read_body(request, limits.max_body_bytes, idle_seconds)
    payload, out = await infer_bytes(plane(request), limits, request.headers, body, model, version)
    return Response(payload, headers=out, media_type=out.pop("content-type"))
