"""``/v1/models``: upload, list, inspect, delete, download."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse, Response

from service.control import ControlPlane
from service.http.auth import require
from service.http.bodies import refuse_compressed
from service.http.downloads import stream
from service.http.schemas import ErrorOut, JobOut, ModelList, ModelOut, SubmitOut, VersionOut
from service.settings import Settings
from service.uploads import UploadLimits, receive_upload

router = APIRouter(prefix="/v1/models", tags=["models"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 415, 503, 507)
}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "data"],
                    "properties": {
                        "model": {"type": "string", "format": "binary", "description": "ONNX, TorchScript or .pt2"},
                        "data": {"type": "string", "format": "binary", "description": "sample data .npz"},
                        "config": {"type": "string", "description": 'JSON: {"name": ..., "max_accuracy_drop": ...}'},
                    },
                }
            }
        },
    }
}

Name = Annotated[str, Path(max_length=256)]
Number = Annotated[int, Path(ge=1, le=2**31 - 1)]
FileName = Annotated[str, Path(max_length=64)]


def plane(request: Request) -> ControlPlane:
    """The control plane the composition root put on the app."""
    control: ControlPlane = request.app.state.plane
    return control


@router.post(
    "",
    status_code=202,
    response_model=SubmitOut,
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
    dependencies=[Depends(require("admin"))],
    summary="Upload a model and sample data; queues its optimization",
)
async def upload(
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    control = plane(request)
    settings: Settings = request.app.state.settings
    refuse_compressed(request.headers)
    length = request.headers.get("content-length")
    staged = await receive_upload(  # a client that disconnects midway gets BadRequest (and nothing stays staged)
        request.stream(),
        content_type=request.headers.get("content-type"),
        content_length=int(length) if length and length.isdigit() else None,
        staging_dir=control.artifacts.staging_dir(),
        limits=UploadLimits(
            model_bytes=settings.max_upload_bytes,
            data_bytes=settings.max_data_bytes,
            idle_seconds=settings.upload_idle_seconds,
        ),
    )
    submission = await control.submit(staged, idempotency_key)
    body = SubmitOut(model=ModelOut.of(submission.model), job=JobOut.of(submission.job))
    return JSONResponse(
        body.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{submission.job.id}"}
    )


@router.get("", response_model=ModelList, responses=_ERRORS, dependencies=[Depends(require("infer"))])
async def list_models(request: Request) -> ModelList:
    return ModelList(models=[ModelOut.of(m) for m in await plane(request).models()])


@router.get("/{name}", response_model=ModelOut, responses=_ERRORS, dependencies=[Depends(require("infer"))])
async def get_model(request: Request, name: Name) -> ModelOut:
    return ModelOut.of(await plane(request).model(name))


@router.delete("/{name}", status_code=204, responses=_ERRORS, dependencies=[Depends(require("admin"))])
async def delete_model(request: Request, name: Name) -> Response:
    await plane(request).delete(name)
    return Response(status_code=204)


@router.get(
    "/{name}/versions/{number}",
    response_model=VersionOut,
    responses=_ERRORS,
    dependencies=[Depends(require("infer"))],
)
async def get_version(request: Request, name: Name, number: Number) -> VersionOut:
    return VersionOut.of(await plane(request).version(name, number))


@router.get(
    "/{name}/versions/{number}/{filename}",
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a byte range"}},
    dependencies=[Depends(require("infer"))],
    summary="Download model.onnx, report.json or report.html (Range supported)",
)
async def download(
    request: Request, name: Name, number: Number, filename: Annotated[str, Path(max_length=64)]
) -> Response:
    control = plane(request)
    item = await control.download(name, number, filename)
    return stream(request, control.artifacts, item)
