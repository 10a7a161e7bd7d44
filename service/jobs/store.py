"""The durable job queue: claims with leases, heartbeats, progress, retries and final states.

A job is ``queued`` -> ``running`` (claimed: ``attempts`` + 1, a lease owned by the token
``"<worker id>:<attempt>"``) -> ``succeeded`` | ``failed`` | ``cancelled``. A running job whose
lease expired (its worker died) is reclaimed by the next claim: queued again while attempts are
left, else failed "worker lost N times"; cancelled if a cancel was requested meanwhile.

Claims are exclusive: on SQLite the claim runs inside ``BEGIN IMMEDIATE`` (one writer at a time);
on PostgreSQL it selects with ``FOR UPDATE SKIP LOCKED`` so concurrent claimers never wait on or
take the same row. Every write made on behalf of a claim is guarded by ``id``, ``lease_owner =
token`` and ``status = 'running'`` and checks the row count, so a worker whose lease was taken
over can never commit anything.

Retries after an ambiguous COMMIT (see :mod:`service.storage.db`): every guarded write is
idempotent (run again after it landed, its guard no longer matches and nothing changes), and the
final transitions keep the claim's token in ``lease_owner`` so a re-run recognises its own landed
commit and answers as the first run did. ``claim`` is not retried after an ambiguous COMMIT (a
second claim would strand the first job until its lease expired).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Engine, func, insert, select, update

from service.errors import NotFound
from service.jobs.records import STATUSES, Claim, JobRecord, files_json, job_query, job_record, one_line
from service.storage.db import jobs, models, run_read, run_write, versions

if TYPE_CHECKING:
    from service.storage.catalog import FileRef

_MAX_WORKER_ID = 64


class JobStore:
    """The job queue on one database engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, lease_seconds: float, clock: Callable[[], float] = time.time) -> None:
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be positive")
        self._engine = engine
        self._lease = float(lease_seconds)
        self._clock = clock

    def get(self, job_id: str) -> JobRecord:
        """The job ``job_id``; NotFound when there is none."""
        return run_read(self._engine, lambda conn: self._fetch(conn, job_id))

    def claim(self, worker_id: str) -> Claim | None:
        """Reclaim expired leases, then take the oldest queued job (running, attempts + 1, leased); None if none."""
        if not worker_id or len(worker_id) > _MAX_WORKER_ID:
            raise ValueError(f"worker_id must be 1-{_MAX_WORKER_ID} characters")

        def work(conn: Connection) -> Claim | None:
            now = self._clock()
            self._reclaim(conn, now)
            row = conn.execute(
                select(jobs.c.id, jobs.c.attempts)
                .where(jobs.c.status == "queued")
                .order_by(jobs.c.created_at, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            attempt = row.attempts + 1
            token = f"{worker_id}:{attempt}"
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == row.id, jobs.c.status == "queued")
                .values(
                    status="running",
                    stage="starting",
                    progress=0.0,
                    attempts=attempt,
                    lease_owner=token,
                    lease_expires_at=now + self._lease,
                    started_at=now,
                    updated_at=now,
                )
            )
            if result.rowcount != 1:  # pragma: no cover - the row is locked by this transaction
                return None
            return Claim(job=self._fetch(conn, row.id), token=token)

        return run_write(self._engine, work, idempotent=False)

    def heartbeat(self, claim: Claim) -> Literal["ok", "cancel", "lost"]:
        """Renew the lease while ``claim`` still owns the running job: "cancel" when a cancel was requested."""

        def work(conn: Connection) -> Literal["ok", "cancel", "lost"]:
            now = self._clock()
            result = conn.execute(
                update(jobs).where(*self._owns(claim)).values(lease_expires_at=now + self._lease, updated_at=now)
            )
            if result.rowcount != 1:
                return "lost"
            cancel = conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == claim.job.id)).scalar_one()
            return "cancel" if cancel else "ok"

        return run_write(self._engine, work, idempotent=True)

    def progress(self, claim: Claim, stage: str, fraction: float) -> bool:
        """Record the stage and its fraction (clamped to 0..1); False when the lease is lost."""
        value = min(1.0, max(0.0, float(fraction))) if math.isfinite(fraction) else 0.0
        values = {"stage": one_line(stage)[:64], "progress": value}
        return run_write(self._engine, lambda conn: self._guarded(conn, claim, values), idempotent=True)

    def publish_original(self, claim: Claim, files: Mapping[str, FileRef], figures: Mapping[str, Any]) -> bool:
        """Version 1 ready with ``files`` merged in, while ``claim`` owns the running job; False otherwise.

        Called when the sandbox has validated and measured the original, before the candidates:
        from then on version 1 is served (and is the default while the model has none).
        ``figures`` holds the baseline's ``metric`` and ``accuracy``.
        """

        def work(conn: Connection) -> bool:
            job = conn.execute(select(jobs.c.model_id).where(*self._owns(claim)).with_for_update()).first()
            if job is None:
                return False
            measured = {"metric": figures.get("metric"), "baseline_accuracy": figures.get("accuracy")}
            if not _ready_original(conn, job.model_id, files, measured):
                return False
            conn.execute(
                update(models)
                .where(models.c.id == job.model_id, models.c.default_version.is_(None))
                .values(default_version=1)
            )
            return True

        return run_write(self._engine, work, idempotent=True)

    def succeed(
        self,
        claim: Claim,
        *,
        optimized_files: Mapping[str, FileRef],
        summary: Mapping[str, Any],
        original_files: Mapping[str, FileRef],
    ) -> int | None:
        """Commit the result in one transaction while ``claim`` owns the job; the new version's number, or None.

        Version 1 becomes ready with ``original_files`` merged into its files; a new version
        (``max + 1``, kind optimized, ready) holds ``optimized_files`` and ``summary``; the job
        succeeds with ``result_version``. The model's default version becomes the new one when the
        job's config has ``deploy`` (default true), else version 1 if the model had no default.
        When the lease was lost nothing changes and None is returned. Called again with the same
        claim after it landed: the same number, nothing new.
        """

        def work(conn: Connection) -> int | None:
            job = conn.execute(
                select(jobs.c.model_id, jobs.c.status, jobs.c.lease_owner, jobs.c.result_version, jobs.c.config)
                .where(jobs.c.id == claim.job.id)
                .with_for_update()
            ).first()
            if job is None or job.lease_owner != claim.token:
                return None
            if job.status == "succeeded":
                return int(job.result_version)  # this claim's own earlier commit
            if job.status != "running":
                return None
            now = self._clock()
            model = conn.execute(
                select(models.c.default_version).where(models.c.id == job.model_id).with_for_update()
            ).one()
            original = _ready_original(conn, job.model_id, original_files, summary)
            top = conn.execute(select(func.max(versions.c.number)).where(versions.c.model_id == job.model_id)).scalar()
            number = int(top or 0) + 1
            conn.execute(
                insert(versions).values(
                    model_id=job.model_id,
                    number=number,
                    kind="optimized",
                    state="ready",
                    files=files_json(optimized_files),
                    summary=dict(summary),
                    created_at=now,
                )
            )
            default: int | None = model.default_version
            if bool(dict(job.config or {}).get("deploy", True)):
                default = number
            elif default is None and original:
                default = 1
            if default != model.default_version:
                conn.execute(update(models).where(models.c.id == job.model_id).values(default_version=default))
            done = conn.execute(
                update(jobs)
                .where(*self._owns(claim))
                .values(
                    status="succeeded",
                    stage="done",
                    progress=1.0,
                    error=None,
                    result_version=number,
                    lease_expires_at=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            if done.rowcount != 1:  # pragma: no cover - the row is locked by this transaction
                raise RuntimeError("job changed while locked")
            return number

        return run_write(self._engine, work, idempotent=True)

    def fail(self, claim: Claim, reason: str, *, original_state: str | None = None) -> bool:
        """Fail the job for good with the one-line ``reason`` (version 1 -> ``original_state`` if given)."""
        if original_state not in (None, "pending", "ready", "failed"):
            raise ValueError(f"unknown version state {original_state!r}")
        values = {"status": "failed", "error": one_line(reason)}

        def also(conn: Connection, _now: float) -> None:
            if original_state is not None:
                where = [versions.c.model_id == claim.job.model_id, versions.c.number == 1]
                if original_state != "ready":  # an original already validated and served stays so
                    where.append(versions.c.state != "ready")
                conn.execute(update(versions).where(*where).values(state=original_state))

        return self._finish(claim, values, also)

    def finish_cancelled(self, claim: Claim) -> bool:
        """The worker stopped the job on a cancel request: cancelled; False when the lease is lost."""
        return self._finish(claim, {"status": "cancelled", "stage": "cancelled"})

    def release(self, claim: Claim, reason: str) -> bool:
        """Give the job back (worker shutting down): queued again while attempts are left, else failed.

        A job with a pending cancel request is cancelled instead. False when the lease is lost.
        """
        note = one_line(reason)

        def work(conn: Connection) -> bool:
            now = self._clock()
            stamp = {"updated_at": now, "lease_expires_at": None}
            final = {**stamp, "finished_at": now}
            steps: list[tuple[list[Any], dict[str, Any]]] = [
                ([jobs.c.cancel_requested.is_(True)], {**final, "status": "cancelled", "stage": "cancelled"}),
                ([jobs.c.attempts >= jobs.c.max_attempts], {**final, "status": "failed", "error": note}),
                (
                    [],
                    {
                        **stamp,
                        "status": "queued",
                        "stage": "queued",
                        "progress": 0.0,
                        "error": note,
                        "lease_owner": None,
                    },
                ),
            ]
            for extra, values in steps:
                if conn.execute(update(jobs).where(*self._owns(claim), *extra).values(**values)).rowcount == 1:
                    return True
            return False

        return run_write(self._engine, work, idempotent=True)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel: a queued job at once, a running one by request (its worker stops it); finished jobs stay."""

        def work(conn: Connection) -> JobRecord:
            status = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id).with_for_update()).scalar()
            if status is None:
                raise NotFound("job not found")
            now = self._clock()
            if status == "queued":
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status == "queued")
                    .values(status="cancelled", stage="cancelled", finished_at=now, updated_at=now)
                )
            elif status == "running":
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status == "running")
                    .values(cancel_requested=True, updated_at=now)
                )
            return self._fetch(conn, job_id)

        return run_write(self._engine, work, idempotent=True)

    def reclaim_expired(self) -> int:
        """Requeue, fail or cancel running jobs whose lease expired; how many were reclaimed."""
        return run_write(self._engine, lambda conn: self._reclaim(conn, self._clock()), idempotent=True)

    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present, zero when none)."""

        def work(conn: Connection) -> dict[str, int]:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
            found = {status: int(count) for status, count in rows}
            return {status: found.get(status, 0) for status in STATUSES}

        return run_read(self._engine, work)

    # -- helpers (each runs inside the caller's transaction) --

    def _fetch(self, conn: Connection, job_id: str) -> JobRecord:
        row = conn.execute(job_query().where(jobs.c.id == job_id)).first() if len(job_id) <= 32 else None
        if row is None:
            raise NotFound("job not found")
        return job_record(row)

    @staticmethod
    def _owns(claim: Claim) -> list[Any]:
        return [jobs.c.id == claim.job.id, jobs.c.lease_owner == claim.token, jobs.c.status == "running"]

    def _guarded(self, conn: Connection, claim: Claim, values: dict[str, Any]) -> bool:
        values = {**values, "updated_at": self._clock()}
        return conn.execute(update(jobs).where(*self._owns(claim)).values(**values)).rowcount == 1

    def _finish(
        self, claim: Claim, values: dict[str, Any], also: Callable[[Connection, float], None] | None = None
    ) -> bool:
        def work(conn: Connection) -> bool:
            now = self._clock()
            final = {**values, "lease_expires_at": None, "finished_at": now, "updated_at": now}
            if conn.execute(update(jobs).where(*self._owns(claim)).values(**final)).rowcount == 1:
                if also is not None:
                    also(conn, now)
                return True
            # a re-run after this claim's own commit landed: the job already carries its final state
            status = conn.execute(
                select(jobs.c.status).where(jobs.c.id == claim.job.id, jobs.c.lease_owner == claim.token)
            ).scalar()
            return status == values["status"]

        return run_write(self._engine, work, idempotent=True)

    def _reclaim(self, conn: Connection, now: float) -> int:
        expired = conn.execute(
            select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts, jobs.c.cancel_requested, jobs.c.lease_owner)
            .where(jobs.c.status == "running", jobs.c.lease_expires_at < now)
            .order_by(jobs.c.created_at)
            .with_for_update(skip_locked=True)
        ).all()
        reclaimed = 0
        for row in expired:
            base = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
            if row.cancel_requested:
                values = {**base, "status": "cancelled", "stage": "cancelled", "finished_at": now}
            elif row.attempts >= row.max_attempts:
                values = {**base, "status": "failed", "error": f"worker lost {row.attempts} times", "finished_at": now}
            else:
                values = {
                    **base,
                    "status": "queued",
                    "stage": "queued",
                    "progress": 0.0,
                    "error": f"lease expired on attempt {row.attempts} of {row.max_attempts}",
                }
            guard = [jobs.c.id == row.id, jobs.c.status == "running", jobs.c.lease_owner == row.lease_owner]
            reclaimed += conn.execute(update(jobs).where(*guard).values(**values)).rowcount
        return reclaimed


def _ready_original(
    conn: Connection, model_id: int, files: Mapping[str, FileRef], optimized: Mapping[str, Any]
) -> bool:
    """Mark version 1 ready with ``files`` merged into its files and the original's measured figures
    (``metric`` and ``baseline_accuracy`` of ``optimized``, a job summary) in its summary; False when
    the model has no version 1."""
    original = conn.execute(
        select(versions.c.id, versions.c.files, versions.c.summary).where(
            versions.c.model_id == model_id, versions.c.number == 1
        )
    ).first()
    if original is None:
        return False
    measured = {"metric": optimized.get("metric"), "accuracy": optimized.get("baseline_accuracy"), "speedup": 1.0}
    summary = {**dict(original.summary or {}), **{k: v for k, v in measured.items() if v is not None}}
    merged = {**dict(original.files or {}), **files_json(files)}
    conn.execute(
        update(versions).where(versions.c.id == original.id).values(state="ready", files=merged, summary=summary)
    )
    return True
