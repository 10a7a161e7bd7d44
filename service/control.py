"""The control plane: uploads, models, versions, jobs and downloads, with no web framework in sight.

The HTTP layer decodes a request and calls one method here; everything this module does is
protocol-agnostic, so a gRPC front end or a test can drive it the same way. Blocking work
(database, file system, S3) runs in a worker thread so the event loop stays free.

Upload order (RELIABILITY invariant 1): the staged files are fsynced and renamed into the
artifact store first, then the rows are committed, then the caller answers 202. A crash between
the two leaves unreferenced files, never a row pointing at nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import anyio

from optimizer.data import DataLimits, inspect_npz
from optimizer.errors import InvalidData, OptimizerError
from optimizer.io import sniff_format
from service.errors import BadRequest, NotFound, UnsupportedFormat
from service.jobconfig import JobConfig, check_name
from service.jobs.records import JobRecord
from service.jobs.store import JobStore
from service.settings import Settings
from service.storage.artifacts import ArtifactStore
from service.storage.catalog import Catalog, FileRef, ModelRecord, VersionRecord
from service.uploads import StagedUpload

#: The file extension each sniffed model format is stored under.
_EXTENSIONS = {"onnx": "onnx", "torchscript": "pt", "torch_export": "pt2"}
#: Files a client may download from a version (the stored original is kept internal).
DOWNLOADABLE = ("model.onnx", "report.json", "report.html")


@dataclass(frozen=True)
class Download:
    """A file ready to stream: where it lives in the artifact store, its size and sha256."""

    key: str
    size: int
    sha256: str
    filename: str


@dataclass(frozen=True)
class Submission:
    """The outcome of an upload: the model, its job, and whether this call created them."""

    model: ModelRecord
    job: JobRecord
    created: bool


class ControlPlane:
    """Everything the ``/v1`` API does, over the catalog, the job store and the artifact store."""

    def __init__(self, *, catalog: Catalog, jobs: JobStore, artifacts: ArtifactStore, settings: Settings) -> None:
        self.catalog = catalog
        self.jobs = jobs
        self.artifacts = artifacts
        self.settings = settings

    async def submit(self, staged: StagedUpload, idempotency_key: str | None = None) -> Submission:
        """Validate an upload, publish its files, queue its job. The staged files are consumed."""
        try:
            return await anyio.to_thread.run_sync(self._submit, staged, idempotency_key)
        finally:
            staged.cleanup()

    def _submit(self, staged: StagedUpload, idempotency_key: str | None) -> Submission:
        config = JobConfig.parse(staged.config)
        source_format = self._model_format(staged)
        self._check_data(staged)
        prefix = secrets.token_hex(16)
        uploads = f"models/{prefix}/uploads"
        original_name = f"original.{_EXTENSIONS[source_format]}"
        files: dict[str, FileRef] = {}
        try:
            for name, part in ((original_name, staged.model), ("data.npz", staged.data)):
                stored = self.artifacts.put_file(f"{uploads}/{name}", part.path, move=True, sha256=part.sha256)
                files[name] = FileRef(key=stored.key, size=stored.size, sha256=stored.sha256)
            model, job, created = self.catalog.create_upload(
                name=config.name,
                storage_prefix=prefix,
                original_files=files,
                source_format=source_format,
                job_config=config.model_dump(mode="json"),
                max_attempts=self.settings.max_attempts,
                idempotency_key=idempotency_key,
            )
        except BaseException:
            self.artifacts.delete_prefix(f"models/{prefix}/")
            raise
        if not created:  # a retried upload: the first one's files and rows stand
            self.artifacts.delete_prefix(f"models/{prefix}/")
        return Submission(model=model, job=job, created=created)

    @staticmethod
    def _model_format(staged: StagedUpload) -> str:
        """The model's format, from its bytes (never its name); nothing is deserialised."""
        try:
            source_format = sniff_format(staged.model.path)
        except OptimizerError as exc:
            raise UnsupportedFormat(f"model: {exc}") from None
        if source_format not in _EXTENSIONS:
            raise UnsupportedFormat(f"model: unsupported format {source_format}")
        return source_format

    def _check_data(self, staged: StagedUpload) -> None:
        """Headers, names, dtypes and sizes of the sample data, read without loading any array."""
        limits = DataLimits(max_file_bytes=self.settings.max_data_bytes)
        try:
            arrays = inspect_npz(staged.data.path, limits)
        except InvalidData as exc:
            raise BadRequest(f"data: {exc}") from None
        if not any(name != "labels" for name in arrays):
            raise BadRequest("data: sample data holds no input arrays")

    async def models(self) -> list[ModelRecord]:
        """Every model, newest first as the catalog orders them."""
        return await anyio.to_thread.run_sync(self.catalog.list_models)

    async def model(self, name: str) -> ModelRecord:
        """One model with its versions and latest job; NotFound."""
        check_name(name)
        return await anyio.to_thread.run_sync(self.catalog.get_model, name)

    async def version(self, name: str, number: int) -> VersionRecord:
        """One version; NotFound."""
        check_name(name)
        return await anyio.to_thread.run_sync(self.catalog.get_version, name, number)

    async def delete(self, name: str) -> None:
        """Remove a model's rows (its jobs go with them), then its files; a running job's commit then fails."""
        check_name(name)
        prefix = await anyio.to_thread.run_sync(self.catalog.delete_model, name)
        await anyio.to_thread.run_sync(self.artifacts.delete_prefix, f"models/{prefix}/")

    async def job(self, job_id: str) -> JobRecord:
        """One job; NotFound."""
        check_job_id(job_id)
        return await anyio.to_thread.run_sync(self.jobs.get, job_id)

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, or ask a running one's worker to stop; NotFound."""
        check_job_id(job_id)
        return await anyio.to_thread.run_sync(self.jobs.cancel, job_id)

    async def download(self, name: str, number: int, filename: str) -> Download:
        """Where a version's file is; NotFound for anything not there (yet)."""
        if filename not in DOWNLOADABLE:
            raise NotFound("no such file")
        version = await self.version(name, number)
        ref = version.files.get(filename)
        if ref is None:
            raise NotFound("no such file")
        return Download(key=ref.key, size=ref.size, sha256=ref.sha256, filename=filename)


def check_job_id(job_id: str) -> None:
    """Job ids are 32 lowercase hex digits; anything else is simply unknown."""
    if len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
        raise NotFound("no such job")
