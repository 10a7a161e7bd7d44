"""The catalog: models, their versions and files, and the one transaction that records an upload.

Rows only point at artifacts (``FileRef.key`` in the artifact store); the artifacts are written,
fsynced and renamed before :meth:`Catalog.create_upload` commits, so a reader that follows rows
never meets a half-written file. A model's ``storage_prefix`` is random per upload, so a model
deleted and re-created under the same name never sees the old one's artifacts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, Row, delete, func, insert, select, update
from sqlalchemy import exc as sa_exc

from service.errors import BadRequest, Conflict, NotFound
from service.jobs.records import JobRecord, files_json, job_query, job_record
from service.storage.db import jobs, models, run_read, run_write, versions

VersionKind = Literal["original", "optimized"]
VersionState = Literal["pending", "ready", "failed"]

_MAX_NAME = 128
_MAX_PREFIX = 64
_MAX_IDEMPOTENCY_KEY = 200


@dataclass(frozen=True)
class FileRef:
    """One stored file of a version: its artifact-store key, size in bytes and sha256 (hex)."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class VersionRecord:
    """One version of a model: 1 is the original upload, later ones are optimized results."""

    number: int
    kind: VersionKind
    state: VersionState
    files: dict[str, FileRef]
    summary: dict[str, Any] | None
    created_at: float


@dataclass(frozen=True)
class ModelRecord:
    """A model with its versions (by number) and its most recent job."""

    id: int
    name: str
    storage_prefix: str
    default_version: int | None
    created_at: float
    versions: tuple[VersionRecord, ...]
    latest_job: JobRecord | None

    def version(self, number: int) -> VersionRecord:
        """Version ``number``; NotFound when the model has none."""
        for record in self.versions:
            if record.number == number:
                return record
        raise NotFound("version not found")


class Catalog:
    """Models and versions on one database engine."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def create_upload(
        self,
        *,
        name: str,
        storage_prefix: str,
        original_files: Mapping[str, FileRef],
        source_format: str,
        job_config: Mapping[str, Any],
        max_attempts: int,
        idempotency_key: str | None,
    ) -> tuple[ModelRecord, JobRecord, bool]:
        """Record an upload in ONE transaction: the model, version 1 (original, pending) and a queued job.

        ``original_files`` (the uploaded model and ``data.npz``) must already be in the artifact
        store. ``source_format`` is kept in version 1's summary. Returns ``(model, job, created)``:
        the same ``idempotency_key`` again returns the existing model and job with ``created``
        False and records nothing (whatever the name). A name already taken: Conflict.
        """
        if not name or len(name) > _MAX_NAME:
            raise BadRequest(f"model name must be 1-{_MAX_NAME} characters")
        if not storage_prefix or len(storage_prefix) > _MAX_PREFIX:
            raise ValueError(f"storage_prefix must be 1-{_MAX_PREFIX} characters")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= _MAX_IDEMPOTENCY_KEY:
            raise BadRequest(f"Idempotency-Key must be 1-{_MAX_IDEMPOTENCY_KEY} characters")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

        def existing(conn: Connection) -> tuple[ModelRecord, JobRecord, bool] | None:
            if idempotency_key is None:
                return None
            row = conn.execute(job_query().where(jobs.c.idempotency_key == idempotency_key)).first()
            if row is None:
                return None
            job = job_record(row)
            return self._model(conn, job.model_name), job, False

        def work(conn: Connection) -> tuple[ModelRecord, JobRecord, bool]:
            found = existing(conn)
            if found is not None:
                return found
            if conn.execute(select(models.c.id).where(models.c.name == name)).first() is not None:
                # Postgres (read committed): a concurrent retry with this key may have committed its model
                # and job between the two statements above; each statement sees the latest commits.
                found = existing(conn)
                if found is not None:
                    return found
                raise Conflict(f"model {name!r} already exists")
            now = self._clock()
            model_id = conn.execute(
                insert(models).values(name=name, storage_prefix=storage_prefix, created_at=now).returning(models.c.id)
            ).scalar_one()
            conn.execute(
                insert(versions).values(
                    model_id=model_id,
                    number=1,
                    kind="original",
                    state="pending",
                    files=files_json(original_files),
                    summary={"source_format": source_format},
                    created_at=now,
                )
            )
            job_id = uuid.uuid4().hex
            conn.execute(
                insert(jobs).values(
                    id=job_id,
                    model_id=model_id,
                    status="queued",
                    stage="queued",
                    progress=0.0,
                    config=dict(job_config),
                    attempts=0,
                    max_attempts=max_attempts,
                    cancel_requested=False,
                    idempotency_key=idempotency_key,
                    created_at=now,
                    updated_at=now,
                )
            )
            job = job_record(conn.execute(job_query().where(jobs.c.id == job_id)).one())
            return self._model(conn, name), job, True

        # With a key a re-run after a landed commit finds that commit's job; without one it would
        # meet its own model as a Conflict, so it is not retried then.
        idempotent = idempotency_key is not None
        try:
            return run_write(self._engine, work, idempotent=idempotent)
        except sa_exc.IntegrityError:
            # A concurrent upload took the name or the key between our check and insert (PostgreSQL;
            # SQLite serialises writers). Once more: now the check sees it and answers properly.
            try:
                return run_write(self._engine, work, idempotent=idempotent)
            except sa_exc.IntegrityError as exc:
                raise Conflict(f"model {name!r} already exists") from exc

    def list_models(self) -> list[ModelRecord]:
        """Every model by name, with its versions and latest job."""

        def work(conn: Connection) -> list[ModelRecord]:
            rows = conn.execute(select(models).order_by(models.c.name)).all()
            by_model: dict[int, list[VersionRecord]] = {}
            for row in conn.execute(select(versions).order_by(versions.c.model_id, versions.c.number)):
                by_model.setdefault(row.model_id, []).append(_version(row))
            rank = (
                func.row_number()
                .over(partition_by=jobs.c.model_id, order_by=(jobs.c.created_at.desc(), jobs.c.id.desc()))
                .label("rank")
            )
            ranked = select(jobs.c.id, rank).subquery()
            latest = {
                record.model_id: record
                for record in map(
                    job_record,
                    conn.execute(job_query().join(ranked, ranked.c.id == jobs.c.id).where(ranked.c.rank == 1)),
                )
            }
            return [_model(row, by_model.get(row.id, []), latest.get(row.id)) for row in rows]

        return run_read(self._engine, work)

    def get_model(self, name: str) -> ModelRecord:
        """The model ``name``; NotFound when there is none."""
        return run_read(self._engine, lambda conn: self._model(conn, name))

    def get_version(self, name: str, number: int) -> VersionRecord:
        """Version ``number`` of model ``name``; NotFound when either is missing."""

        def work(conn: Connection) -> VersionRecord:
            row = conn.execute(
                select(versions)
                .join(models, models.c.id == versions.c.model_id)
                .where(models.c.name == name, versions.c.number == number)
            ).first()
            if row is None:
                raise NotFound("version not found")
            return _version(row)

        return run_read(self._engine, work)

    def set_default_version(self, name: str, number: int) -> ModelRecord:
        """Make version ``number`` of ``name`` the one served by default (deploy / rollback).

        NotFound unless the model has that version in state ``ready``. Setting the current default
        again changes nothing (safe to retry). Returns the model as committed.
        """

        def work(conn: Connection) -> ModelRecord:
            row = conn.execute(select(models.c.id).where(models.c.name == name).with_for_update()).first()
            if row is None:
                raise NotFound("model not found")
            state = conn.execute(
                select(versions.c.state).where(versions.c.model_id == row.id, versions.c.number == number)
            ).scalar()
            if state != "ready":
                raise NotFound("version not found or not ready")
            conn.execute(update(models).where(models.c.id == row.id).values(default_version=number))
            return self._model(conn, name)

        return run_write(self._engine, work, idempotent=True)

    def delete_model(self, name: str) -> str:
        """Delete the model with its versions and jobs; returns its storage prefix (artifacts to remove)."""

        def work(conn: Connection) -> str:
            row = conn.execute(
                select(models.c.id, models.c.storage_prefix).where(models.c.name == name).with_for_update()
            ).first()
            if row is None:
                raise NotFound("model not found")
            conn.execute(delete(models).where(models.c.id == row.id))  # versions and jobs cascade
            return str(row.storage_prefix)

        return run_write(self._engine, work, idempotent=False)

    def _model(self, conn: Connection, name: str) -> ModelRecord:
        row = conn.execute(select(models).where(models.c.name == name)).first()
        if row is None:
            raise NotFound("model not found")
        found = conn.execute(select(versions).where(versions.c.model_id == row.id).order_by(versions.c.number))
        job = conn.execute(
            job_query().where(jobs.c.model_id == row.id).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(1)
        ).first()
        return _model(row, [_version(v) for v in found], job_record(job) if job is not None else None)


def _version(row: Row[Any]) -> VersionRecord:
    files = {
        name: FileRef(key=str(ref["key"]), size=int(ref["size"]), sha256=str(ref["sha256"]))
        for name, ref in dict(row.files or {}).items()
    }
    return VersionRecord(
        number=row.number,
        kind=row.kind,
        state=row.state,
        files=files,
        summary=dict(row.summary) if row.summary is not None else None,
        created_at=row.created_at,
    )


def _model(row: Row[Any], found: list[VersionRecord], latest_job: JobRecord | None) -> ModelRecord:
    return ModelRecord(
        id=row.id,
        name=row.name,
        storage_prefix=row.storage_prefix,
        default_version=row.default_version,
        created_at=row.created_at,
        versions=tuple(found),
        latest_job=latest_job,
    )
