"""The background worker: claim a job, run the optimization in a sandbox child, publish, commit.

One attempt, in order: claim (a lease owned by ``"<worker id>:<attempt>"``); download version 1's
upload into a fresh temp folder; run :func:`service.jobs.task.run_optimization` in a child
process (scrubbed environment: no database or storage credentials; memory and wall-time limits)
while a heartbeat thread renews the lease and the child's progress events are written, throttled,
to the job row; upload the outputs under a per-attempt prefix
(``models/<storage prefix>/jobs/<job id>/<attempt>/``, so no row ever points at a killed attempt's
files); commit the new version in one guarded transaction.

Outcomes: a bad model or bad data, a crash, running out of memory or time fail the job with the
reason (final); a cancel request kills the child and ends the job cancelled; a lost lease (another
worker reclaimed the job) kills the child and commits nothing, deleting what this attempt
uploaded; the worker's stop event kills the child and gives the job back (queued again while
attempts are left); other infrastructure failures (database or storage unavailable) give it back
too. The lease is the safety net: if this process dies, the job is reclaimed once it expires.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from optimizer.errors import ConversionFailed, InvalidModel, OptimizerError, UnsupportedModel
from optimizer.sandbox import SandboxCancelled, SandboxLimits, redact_paths, run_isolated
from service.errors import NotFound, ServiceError, StorageFull
from service.jobconfig import JobConfig
from service.jobs.early import EarlyOriginal
from service.jobs.records import Claim
from service.jobs.store import JobStore
from service.jobs.task import clean_summary, run_optimization
from service.metrics import JobMetrics
from service.settings import Settings
from service.storage.artifacts import ArtifactStore
from service.storage.catalog import Catalog, FileRef

_log = logging.getLogger(__name__)

#: The optimized version's files, as the task writes them into its output folder.
OPTIMIZED_FILES = ("model.onnx", "report.json", "report.html")
#: The validated original (ONNX) the task writes; version 1 serves it as ``model.onnx``.
ORIGINAL_OUTPUT = "original.onnx"
#: Extensions of the uploaded model in version 1 (``original.<ext>``).
MODEL_EXTENSIONS = frozenset({"onnx", "pt", "pt2"})
#: Errors that mean the uploaded model itself is unusable: version 1 fails with the job.
MODEL_ERRORS = (InvalidModel, UnsupportedModel, ConversionFailed)
#: Progress writes for one stage are at least this far apart.
PROGRESS_INTERVAL_S = 0.5

_MAX_BACKOFF_S = 30.0

StopReason = Literal["lost", "cancel", "stop"]


def default_worker_id() -> str:
    """``<host>-<pid>-<random>``: unique per worker object, at most 64 characters."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


class Worker:
    """Runs optimization jobs from the queue, one at a time (start several for parallelism)."""

    def __init__(
        self,
        *,
        jobs: JobStore,
        catalog: Catalog,
        artifacts: ArtifactStore,
        settings: Settings,
        metrics: JobMetrics | None = None,
        worker_id: str | None = None,
        task: Callable[..., dict[str, Any]] = run_optimization,
    ) -> None:
        """``task`` runs in the sandbox child (a picklable top-level function; tests inject their own)."""
        self.jobs = jobs
        self.catalog = catalog
        self.artifacts = artifacts
        self.settings = settings
        self.metrics = metrics
        self.worker_id = worker_id or default_worker_id()
        self.task = task

    def run_forever(self, stop: threading.Event) -> None:
        """Run jobs until ``stop`` is set; wait ``poll_seconds`` when idle, back off on store errors."""
        failures = 0
        while not stop.is_set():
            try:
                ran = self.run_once(stop)
            except Exception as exc:  # the queue itself failed (database down): keep the worker alive
                failures += 1
                delay = min(self.settings.poll_seconds * 2 ** min(failures, 8), _MAX_BACKOFF_S)
                _log.warning("worker %s: claiming failed (%s); retrying in %.1f s", self.worker_id, _reason(exc), delay)
                stop.wait(delay)
                continue
            failures = 0
            if not ran:
                stop.wait(self.settings.poll_seconds)

    def run_once(self, stop: threading.Event | None = None) -> bool:
        """Claim and run one job to its outcome; False when none was queued. Store errors on claim propagate."""
        claim = self.jobs.claim(self.worker_id)
        if claim is None:
            return False
        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.job_started()
        try:
            status = self._run(claim, stop or threading.Event())
        finally:
            if self.metrics is not None:
                self.metrics.job_ended()
        if status is not None and self.metrics is not None:
            self.metrics.job_finished(status, time.monotonic() - started)
        return True

    # -- one attempt --

    def _run(self, claim: Claim, stop: threading.Event) -> str | None:
        """Run the claimed job; the final status this worker gave it, or None (given back or lost)."""
        job = claim.job
        _log.info("job %s (%s) attempt %d started on %s", job.id, job.model_name, job.attempts, self.worker_id)
        lease = _Lease(self.jobs, claim, self.settings, stop)
        folder: Path | None = None
        lease.start()
        try:
            folder = Path(tempfile.mkdtemp(prefix="slimserve-job-"))
            status = self._attempt(claim, folder, lease)
        except Exception as exc:  # infrastructure (database, storage, local disk) or a bug: give the job back
            _log.warning("job %s: attempt %d given back: %s", job.id, job.attempts, _reason(exc), exc_info=True)
            why = "worker stopped" if lease.reason() == "stop" else f"worker could not finish: {_reason(exc)}"
            self._give_back(claim, why)
            status = None
        finally:
            lease.close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        _log.info("job %s attempt %d ended: %s", job.id, job.attempts, status or "not finished here")
        return status

    def _attempt(self, claim: Claim, folder: Path, lease: _Lease) -> str | None:
        job = claim.job
        try:
            options = JobConfig.model_validate(job.config).optimize_config().model_dump(mode="json")
        except (ValidationError, OptimizerError) as exc:
            return self._fail(claim, f"invalid job config: {_reason(exc)}")
        self._clear_earlier_attempts(claim)
        try:
            inputs = self._download(claim, folder / "in")
        except _Unusable as exc:
            return self._fail(claim, str(exc))
        if inputs is None:  # the model was deleted meanwhile: so was the job
            return None
        model, data = inputs
        out = folder / "work" / "out"
        progress = _Progress(self.jobs, claim, lease)
        early_dir = folder / "work" / "early"
        early = EarlyOriginal(
            jobs=self.jobs, catalog=self.catalog, artifacts=self.artifacts, claim=claim, folder=early_dir
        )

        def on_event(event: dict[str, Any]) -> None:
            if "original" in event:
                early(event)
            else:
                progress(event)

        limits = SandboxLimits(
            memory_bytes=self.settings.job_memory_bytes,
            timeout_s=self.settings.job_timeout_seconds,
            cpu_threads=self.settings.job_cpu_threads,
            nice=self.settings.job_nice,
        )
        try:
            summary = run_isolated(
                self.task,
                str(model),
                str(data),
                str(out),
                options,
                str(early.folder),
                limits=limits,
                description="optimization",
                on_event=on_event,
                should_stop=lease.should_stop,
            )
        except SandboxCancelled:
            return self._stopped(claim, lease)
        except OptimizerError as exc:  # bad model or data, crash, out of memory, timeout
            if lease.reason() == "cancel":  # the user's cancel outranks a failure that came meanwhile
                return self._stopped(claim, lease)
            state = "failed" if isinstance(exc, MODEL_ERRORS) else None
            return self._fail(claim, str(exc), original_state=state)
        reason = lease.reason()
        if reason in ("lost", "cancel"):  # the result is not wanted any more
            return self._stopped(claim, lease)
        return self._publish(claim, out, summary, early.ref)

    def _clear_earlier_attempts(self, claim: Claim) -> None:
        """Delete what earlier attempts of this job uploaded: they died before committing (SIGKILL, a
        lost host), so no row points at their outputs; an early original stays if version 1 uses it.

        Safe against a zombie of an earlier attempt: its lease is gone, so it can no longer commit,
        and it deletes its own prefix when it finds out. Best effort (deletion failures are logged).
        """
        job = claim.job
        if job.attempts <= 1:
            return
        base = f"models/{job.storage_prefix}/jobs/{job.id}"
        try:
            used = {ref.key for ref in self.catalog.get_version(job.model_name, 1).files.values()}
        except NotFound:
            used = set()
        for attempt in range(1, job.attempts):
            self.artifacts.delete_prefix(f"{base}/{attempt}")
            early = f"{base}/early-{attempt}/"
            if not any(key.startswith(early) for key in used):
                self.artifacts.delete_prefix(early)

    def _download(self, claim: Claim, folder: Path) -> tuple[Path, Path] | None:
        """Version 1's model and data into ``folder``, checksums verified; None when the model is gone."""
        try:
            version = self.catalog.get_version(claim.job.model_name, 1)
        except NotFound:
            _log.warning("job %s: model %s was deleted while queued", claim.job.id, claim.job.model_name)
            return None
        models = [name for name in version.files if name.startswith("original.")]
        if len(models) != 1 or "data.npz" not in version.files:
            raise _Unusable("the upload's files are missing")
        extension = models[0].split(".", 1)[1]
        if extension not in MODEL_EXTENSIONS:
            raise _Unusable("the upload's model file has an unknown type")
        folder.mkdir(parents=True)
        local = {models[0]: folder / f"original.{extension}", "data.npz": folder / "data.npz"}
        for name, path in local.items():
            ref = version.files[name]
            try:
                self.artifacts.get_file(ref.key, path)
            except NotFound as exc:
                raise _Unusable("the upload's files are missing from storage") from exc
            with path.open("rb") as fh:
                if hashlib.file_digest(fh, "sha256").hexdigest() != ref.sha256:
                    raise _Unusable(f"the uploaded {name.split('.')[0]} file is corrupted in storage")
        return local[models[0]], local["data.npz"]

    def _publish(self, claim: Claim, out: Path, summary: Any, original: FileRef | None) -> str | None:
        """Upload the outputs under this attempt's prefix and commit the new version.

        ``original`` is version 1's file when it was published early (else it is uploaded here).
        """
        job = claim.job
        names = OPTIMIZED_FILES if original is not None else (*OPTIMIZED_FILES, ORIGINAL_OUTPUT)
        try:
            files = {name: _output_file(out, name) for name in names}
        except _Unusable as exc:
            return self._fail(claim, str(exc))
        prefix = f"models/{job.storage_prefix}/jobs/{job.id}/{job.attempts}"
        stored: dict[str, FileRef] = {}
        try:
            for name, path in files.items():
                item = self.artifacts.put_file(f"{prefix}/{name}", path)
                stored[name] = FileRef(key=item.key, size=item.size, sha256=item.sha256)
        except StorageFull as exc:
            self.artifacts.delete_prefix(prefix)
            return self._fail(claim, exc.message)
        except BaseException:
            self.artifacts.delete_prefix(prefix)
            raise
        # If succeed raises (database unavailable), its commit may still have landed: the files stay.
        number = self.jobs.succeed(
            claim,
            optimized_files={name: stored[name] for name in OPTIMIZED_FILES},
            summary=clean_summary(summary),
            original_files={"model.onnx": original or stored[ORIGINAL_OUTPUT]},
        )
        if number is None:
            _log.warning("job %s: lease lost before the commit; attempt %d discarded", job.id, job.attempts)
            self.artifacts.delete_prefix(prefix)
            return None
        _log.info("job %s: version %d of %s is ready", job.id, number, job.model_name)
        return "succeeded"

    # -- outcomes --

    def _fail(self, claim: Claim, reason: str, *, original_state: str | None = None) -> str | None:
        reason = redact_paths(reason)  # the reason reaches API clients: no file paths
        _log.info("job %s failed: %s", claim.job.id, reason)
        return "failed" if self.jobs.fail(claim, reason, original_state=original_state) else None

    def _stopped(self, claim: Claim, lease: _Lease) -> str | None:
        """The child was stopped (or its result is unwanted): act on why."""
        reason = lease.reason()
        if reason == "cancel":
            return "cancelled" if self.jobs.finish_cancelled(claim) else None
        if reason == "stop":
            self._give_back(claim, "worker stopped")
        return None  # lost: another worker owns the job now; nothing more to do

    def _give_back(self, claim: Claim, reason: str) -> None:
        try:
            self.jobs.release(claim, reason)
        except Exception as exc:  # the lease will expire and the job be reclaimed
            _log.warning("job %s: could not give the job back (%s); its lease will expire", claim.job.id, _reason(exc))


class _Unusable(Exception):
    """The job cannot run with what was stored (its message is the job's one-line failure reason)."""


class _Lease:
    """Renews the claim's lease every ``heartbeat_seconds`` and remembers why the job must stop.

    A lease that could not be renewed for ``lease_seconds`` (database unreachable) counts as lost:
    another worker may have reclaimed the job by then, and two attempts must not run at once.
    """

    def __init__(self, jobs: JobStore, claim: Claim, settings: Settings, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{claim.job.id[:8]}", daemon=True)
        self._jobs = jobs
        self._claim = claim
        self._interval = settings.heartbeat_seconds
        self._lease_s = settings.lease_seconds
        self._stop_event = stop
        self._done = threading.Event()
        self._state: Literal["lost", "cancel"] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start heartbeating."""
        self._thread.start()

    def _beat(self) -> None:
        renewed = time.monotonic()
        while not self._done.wait(self._interval):
            try:
                answer = self._jobs.heartbeat(self._claim)
            except Exception as exc:
                _log.warning("job %s: heartbeat failed: %s", self._claim.job.id, _reason(exc))
                if time.monotonic() - renewed >= self._lease_s:
                    self.mark("lost")
                    return
                continue
            renewed = time.monotonic()
            if answer != "ok":
                self.mark(answer)
                return

    def mark(self, state: Literal["lost", "cancel"]) -> None:
        """Record that the job must stop; "lost" outranks "cancel"."""
        with self._lock:
            if self._state != "lost":
                self._state = state

    def reason(self) -> StopReason | None:
        """Why the job must stop now (lease lost, cancel requested, worker stopping), or None."""
        with self._lock:
            state = self._state
        if state is not None:
            return state
        return "stop" if self._stop_event.is_set() else None

    def should_stop(self) -> bool:
        """The sandbox's poll: True once the job must stop."""
        return self.reason() is not None

    def close(self) -> None:
        """Stop heartbeating (after the attempt's outcome is committed or abandoned)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


class _Progress:
    """The sandbox's ``on_event``: writes progress to the job row on a stage change or every 0.5 s."""

    def __init__(self, jobs: JobStore, claim: Claim, lease: _Lease) -> None:
        self._jobs = jobs
        self._claim = claim
        self._lease = lease
        self._stage: str | None = None
        self._written = -math.inf

    def __call__(self, event: dict[str, Any]) -> None:
        stage, fraction = event.get("stage"), event.get("progress")
        if not isinstance(stage, str) or isinstance(fraction, bool) or not isinstance(fraction, int | float):
            return
        now = time.monotonic()
        if stage == self._stage and now - self._written < PROGRESS_INTERVAL_S:
            return
        self._stage, self._written = stage, now
        try:
            if not self._jobs.progress(self._claim, stage, float(fraction)):
                self._lease.mark("lost")
        except Exception as exc:  # progress is informative: never stop the job for it
            _log.warning("job %s: progress not recorded: %s", self._claim.job.id, _reason(exc))


def _output_file(out: Path, name: str) -> Path:
    """``out/name`` if the child left it as a regular file (never a symlink it could point anywhere)."""
    path = out / name
    try:
        info = path.lstat()
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise _Unusable(f"the optimization left no {name}")
    return path


def _reason(exc: BaseException) -> str:
    """One line for a log or a job's reason (never a traceback)."""
    if isinstance(exc, ServiceError):
        return exc.message
    if isinstance(exc, OptimizerError):
        return str(exc)
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ())) or "value"
        return f"{where}: {error.get('msg', 'invalid')}"
    with contextlib.suppress(Exception):
        line = str(exc).strip().splitlines()[0][:200]
        return f"{type(exc).__name__}: {line}"
    return type(exc).__name__
