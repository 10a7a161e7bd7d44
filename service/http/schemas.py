"""Response bodies of the ``/v1`` API (pydantic models, so the OpenAPI page documents them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from service.jobs.records import JobRecord
from service.storage.catalog import ModelRecord, VersionRecord


class FileOut(BaseModel):
    size: int
    sha256: str


class VersionOut(BaseModel):
    number: int
    kind: Literal["original", "optimized"]
    state: Literal["pending", "ready", "failed"]
    files: dict[str, FileOut]
    summary: dict[str, Any] | None
    created_at: float

    @classmethod
    def of(cls, version: VersionRecord) -> VersionOut:
        files = {
            name: FileOut(size=ref.size, sha256=ref.sha256)
            for name, ref in version.files.items()
            if not name.startswith("original.") and name != "data.npz"  # uploads stay internal
        }
        return cls(
            number=version.number,
            kind=version.kind,
            state=version.state,
            files=files,
            summary=version.summary,
            created_at=version.created_at,
        )


class JobOut(BaseModel):
    id: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str
    progress: float
    error: str | None
    version: int | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def of(cls, job: JobRecord) -> JobOut:
        return cls(
            id=job.id,
            model=job.model_name,
            status=job.status,
            stage=job.stage,
            progress=job.progress,
            error=job.error,
            version=job.result_version,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class ModelOut(BaseModel):
    name: str
    created_at: float
    default_version: int | None
    versions: list[VersionOut]
    latest_job: JobOut | None

    @classmethod
    def of(cls, model: ModelRecord) -> ModelOut:
        return cls(
            name=model.name,
            created_at=model.created_at,
            default_version=model.default_version,
            versions=[VersionOut.of(v) for v in model.versions],
            latest_job=JobOut.of(model.latest_job) if model.latest_job else None,
        )


class ModelList(BaseModel):
    models: list[ModelOut]


class SubmitOut(BaseModel):
    model: ModelOut
    job: JobOut


class ErrorOut(BaseModel):
    error: str


# -- KServe v2 (documentation only: the v2 routes answer raw orjson, these describe what they send) --------


class LiveOut(BaseModel):
    live: bool


class ReadyOut(BaseModel):
    ready: bool


class ModelReadyOut(BaseModel):
    name: str
    ready: bool
    version: str | None = None


class ServerMetadataOut(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadataOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataOut(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadataOut]
    outputs: list[TensorMetadataOut]


class InferTensor(BaseModel):
    """One tensor of a request or a response (``data`` absent when it travels as a binary blob)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferOutputIn(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequestIn(BaseModel):
    """``POST /v2/models/{m}/infer`` as JSON (the binary tensor extension sends this header, then the blobs)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor]
    outputs: list[InferOutputIn] | None = None


class InferResponseOut(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferTensor]
