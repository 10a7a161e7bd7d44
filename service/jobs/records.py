"""The job queue's records: a job as stored, a worker's claim on it, and their row mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Row, Select, select

from service.storage.db import jobs, models

if TYPE_CHECKING:
    from service.storage.catalog import FileRef

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]

#: Every job status, in lifecycle order.
STATUSES: tuple[Status, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
#: Statuses a job never leaves.
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

_MAX_REASON = 500


@dataclass(frozen=True)
class JobRecord:
    """One job as stored, with its model's name and storage prefix."""

    id: str
    model_id: int
    model_name: str
    storage_prefix: str
    status: Status
    stage: str
    progress: float
    error: str | None
    config: dict[str, Any]
    attempts: int
    max_attempts: int
    result_version: int | None
    cancel_requested: bool
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def finished(self) -> bool:
        """Whether the job reached a final status."""
        return self.status in FINISHED


@dataclass(frozen=True)
class Claim:
    """A running job held by one worker; ``token`` (``"<worker id>:<attempt>"``) owns its lease."""

    job: JobRecord
    token: str


def job_query() -> Select[Any]:
    """SELECT of every job column plus its model's name and storage prefix (for :func:`job_record`)."""
    return select(jobs, models.c.name.label("model_name"), models.c.storage_prefix).join(
        models, models.c.id == jobs.c.model_id
    )


def job_record(row: Row[Any]) -> JobRecord:
    """A :class:`JobRecord` from a row of :func:`job_query`."""
    m = row._mapping
    return JobRecord(
        id=m["id"],
        model_id=m["model_id"],
        model_name=m["model_name"],
        storage_prefix=m["storage_prefix"],
        status=m["status"],
        stage=m["stage"],
        progress=float(m["progress"]),
        error=m["error"],
        config=dict(m["config"] or {}),
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        result_version=m["result_version"],
        cancel_requested=bool(m["cancel_requested"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


def files_json(files: Mapping[str, FileRef]) -> dict[str, dict[str, Any]]:
    """The ``versions.files`` JSON of ``{filename: FileRef}``."""
    return {name: {"key": ref.key, "size": int(ref.size), "sha256": ref.sha256} for name, ref in files.items()}


def one_line(reason: str) -> str:
    """A stored error message: the first non-empty line, bounded (never empty)."""
    for line in str(reason).splitlines():
        if line.strip():
            return line.strip()[:_MAX_REASON]
    return "failed"
