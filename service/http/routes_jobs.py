"""``/v1/jobs``: follow and cancel optimization jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request

from service.http.auth import require
from service.http.routes_models import plane
from service.http.schemas import ErrorOut, JobOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 503)}
JobId = Annotated[str, Path(max_length=64)]


@router.get("/{job_id}", response_model=JobOut, responses=_ERRORS, dependencies=[Depends(require("infer"))])
async def get_job(request: Request, job_id: JobId) -> JobOut:
    return JobOut.of(await plane(request).job(job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses=_ERRORS,
    dependencies=[Depends(require("admin"))],
    summary="Cancel a queued job at once, or ask a running job's worker to stop",
)
async def cancel_job(request: Request, job_id: JobId) -> JobOut:
    return JobOut.of(await plane(request).cancel(job_id))
