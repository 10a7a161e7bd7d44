"""``/v1`` endpoints of serving: deploy and roll back versions, ground-truth feedback."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request

from service.errors import BadRequest, Conflict
from service.http.auth import require
from service.http.bodies import read_body
from service.http.routes_models import Name, Number, plane
from service.http.routes_v2 import plane as dataplane
from service.http.schemas import ErrorOut, ModelOut
from service.jobconfig import check_name

router = APIRouter(prefix="/v1/models", tags=["serving"])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 503)}
MAX_FEEDBACK_ITEMS = 10_000
#: Bytes a feedback body may have (10 000 items of a short id and a small label fit easily).
MAX_FEEDBACK_BYTES = 8 * 1024 * 1024
_FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "maxItems": MAX_FEEDBACK_ITEMS,
                    "items": {
                        "type": "object",
                        "required": ["id", "label"],
                        "properties": {"id": {"type": "string"}, "label": {}},
                    },
                }
            }
        },
    }
}


@router.post(
    "/{name}/versions/{number}/deploy",
    response_model=ModelOut,
    responses=_ERRORS,
    dependencies=[Depends(require("admin"))],
    summary="Make a ready version the default (loaded and warmed up first; on failure the old one keeps serving)",
)
async def deploy(request: Request, name: Name, number: Number) -> ModelOut:
    check_name(name)
    await dataplane(request).registry.deploy(name, number)
    return ModelOut.of(await plane(request).model(name))


@router.post(
    "/{name}/rollback",
    response_model=ModelOut,
    responses=_ERRORS,
    dependencies=[Depends(require("admin"))],
    summary="Make the newest ready version below the current default the default",
)
async def rollback(request: Request, name: Name) -> ModelOut:
    check_name(name)
    model = await plane(request).model(name)
    current = model.default_version
    older = [v.number for v in model.versions if v.state == "ready" and current is not None and v.number < current]
    if not older:
        raise Conflict("there is no older ready version to roll back to")
    await dataplane(request).registry.deploy(name, max(older))
    return ModelOut.of(await plane(request).model(name))


@router.post(
    "/{name}/feedback",
    responses={**_ERRORS, 413: {"model": ErrorOut}},
    dependencies=[Depends(require("infer"))],
    summary='Ground truth for recent requests: [{"id": ..., "label": ...}]',
    openapi_extra=_FEEDBACK_BODY,
)
async def feedback(
    request: Request,
    name: Name,
    tolerance: Annotated[float, Query(ge=0)] = 1e-3,
) -> dict[str, int]:
    check_name(name)
    items = await _feedback_items(request)
    result = dataplane(request).feedback(name, items, tolerance=tolerance)
    return {"correct": result.correct, "incorrect": result.incorrect, "unknown": result.unknown}


async def _feedback_items(request: Request) -> list[dict[str, Any]]:
    """The body as a list of objects, read here and not by FastAPI.

    FastAPI parses a declared body before it runs the route's dependencies, so a malformed body sent
    without a key was answered 400 instead of 401; reading it in the route keeps the key check first.
    Read as the infer routes read theirs: any Content-Encoding 415 and a declared length over
    ``MAX_FEEDBACK_BYTES`` 413 before a byte is read, the running size 413, a stalled body 400.
    """
    body = await read_body(request, MAX_FEEDBACK_BYTES, request.app.state.settings.upload_idle_seconds)
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("body: JSON decode error") from None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise BadRequest('body: expected a JSON array of {"id": ..., "label": ...} objects')
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise BadRequest(f"body: at most {MAX_FEEDBACK_ITEMS} feedback items per call")
    return items
