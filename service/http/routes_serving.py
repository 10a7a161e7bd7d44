"""``/v1`` endpoints of serving: deploy and roll back versions, ground-truth feedback."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request

from service.errors import Conflict
from service.http.auth import require
from service.http.routes_models import Name, Number, plane
from service.http.routes_v2 import plane as dataplane
from service.http.schemas import ErrorOut, ModelOut
from service.jobconfig import check_name

router = APIRouter(prefix="/v1/models", tags=["serving"])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 503)}
FeedbackItems = Annotated[list[dict[str, Any]], Body(max_length=10_000)]


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
    responses=_ERRORS,
    dependencies=[Depends(require("infer"))],
    summary='Ground truth for recent requests: [{"id": ..., "label": ...}]',
)
async def feedback(
    request: Request,
    name: Name,
    items: FeedbackItems,
    tolerance: Annotated[float, Query(ge=0)] = 1e-3,
) -> dict[str, int]:
    check_name(name)
    result = dataplane(request).feedback(name, items, tolerance=tolerance)
    return {"correct": result.correct, "incorrect": result.incorrect, "unknown": result.unknown}
