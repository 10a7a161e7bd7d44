"""service.jobs.worker: real SQLite file, real artifact folder, real sandbox child processes.

``scripted_task`` stands in for the optimization where a test needs a child that crashes, eats
memory, sleeps or reports its environment: it reads what to do from the uploaded "model" bytes,
so one worker can run a failing job and then a good one. One test runs the real optimizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, update

from optimizer.errors import InvalidModel
from optimizer.sandbox import emit
from service.errors import StorageFull, Unavailable
from service.jobs.records import Claim
from service.jobs.store import JobStore
from service.jobs.task import run_optimization
from service.jobs.worker import Worker
from service.metrics import JobMetrics
from service.settings import Settings
from service.storage.artifacts import LocalStore, open_store
from service.storage.catalog import Catalog, FileRef
from service.storage.db import create_db_engine, jobs, migrate, write_transaction
from tests import builders

REAL_CONFIG = {"techniques": ["int8-dynamic"], "latency_seconds": 0.2, "fallback": False, "measure_memory": False}
WAIT_S = 120.0  # how long a test waits for a child to reach a point (a bound, not a timing assertion)


# ---- the task run in the child ----------------------------------------------------------------


def scripted_task(
    model_path: str, data_path: str, out_dir: str, options: dict[str, Any], early_dir: str | None = None
) -> dict[str, Any]:
    """Do what the uploaded "model" says: crash, oom, sleep <pid file>, env, early [<pid file> | invalid]
    (publish the original early, then sleep, or find the model invalid); anything else succeeds."""
    command = Path(model_path).read_bytes().decode(errors="replace").split()
    action = command[0] if command else ""
    report: dict[str, Any] = {"chosen": "fake", "options": options}
    if action == "early" and early_dir is not None:
        Path(early_dir).mkdir(parents=True)
        (Path(early_dir) / "original.onnx").write_bytes(b"validated early")
        emit({"original": "original.onnx", "metric": "top1", "accuracy": 0.875})
        if command[1:] == ["invalid"]:
            raise InvalidModel("the model is not valid after all")
        if len(command) > 1:
            Path(command[1]).write_text(str(os.getpid()))
            time.sleep(600)
    if action == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "oom":
        report["size"] = len(bytearray(64 * 1024**3))
    elif action == "sleep":
        Path(command[1]).write_text(str(os.getpid()))
        time.sleep(600)
    elif action == "env":
        report["env"] = sorted(os.environ)
        report["environ"] = Path("/proc/self/environ").read_bytes().decode(errors="replace")
    out = Path(out_dir)
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"optimized " + Path(data_path).read_bytes()[:16])
    (out / "original.onnx").write_bytes(b"validated original")
    (out / "report.json").write_text(json.dumps(report))
    (out / "report.html").write_text("<!doctype html><title>fake</title>")
    return {"chosen": "fake", "speedup": 2.0, "not_finite": float("nan"), "nested": {"dropped": True}}


# ---- fixtures and helpers -----------------------------------------------------------------------


@dataclass
class Service:
    """The worker's collaborators on one SQLite file and one artifact folder."""

    root: Path
    engine: Engine
    jobs: JobStore
    catalog: Catalog
    artifacts: LocalStore

    def upload(self, name: str, model: bytes | Path, config: dict[str, Any] | None = None) -> str:
        """Store a model and sample data and record the upload (as the API does); the job id."""
        prefix = secrets.token_hex(8)
        staged = self.root / f"staged-{name}"
        staged.mkdir()
        model_path = model if isinstance(model, Path) else staged / "model"
        if isinstance(model, bytes):
            model_path.write_bytes(model)
        data = builders.mlp_data(staged / "data.npz")
        files = {}
        for filename, source in (("original.onnx", model_path), ("data.npz", data)):
            item = self.artifacts.put_file(f"models/{prefix}/uploads/{filename}", source)
            files[filename] = FileRef(key=item.key, size=item.size, sha256=item.sha256)
        _model, job, _created = self.catalog.create_upload(
            name=name,
            storage_prefix=prefix,
            original_files=files,
            source_format="onnx",
            job_config={"name": name, **(config or {})},
            max_attempts=3,
            idempotency_key=None,
        )
        return job.id

    def worker(
        self,
        task: Callable[..., dict[str, Any]] = scripted_task,
        metrics: JobMetrics | None = None,
        **settings: Any,
    ) -> Worker:
        """A worker on these collaborators; fast heartbeats, one thread per child."""
        defaults: dict[str, Any] = {"heartbeat_seconds": 0.2, "lease_seconds": 30.0, "poll_seconds": 0.05}
        return Worker(
            jobs=self.jobs,
            catalog=self.catalog,
            artifacts=self.artifacts,
            settings=Settings(home=self.root, job_cpu_threads=1, **{**defaults, **settings}),
            metrics=metrics,
            task=task,
        )

    def attempt_keys(self, job_id: str) -> list[Path]:
        """Every file any attempt of ``job_id`` left in the artifact folder."""
        prefix = self.jobs.get(job_id).storage_prefix
        return [p for p in (self.artifacts.root / "models" / prefix / "jobs").rglob("*") if p.is_file()]

    def take_over(self, job_id: str) -> None:
        """Another claimer took the job over (its lease owner changed under the worker)."""
        with write_transaction(self.engine) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_owner="thief:9"))


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the worker's and sandbox's temp folders
    engine = create_db_engine(f"sqlite:///{tmp_path / 'slimserve.db'}")
    migrate(engine)
    artifacts = open_store(str(tmp_path / "artifacts"))
    assert isinstance(artifacts, LocalStore)
    yield Service(tmp_path, engine, JobStore(engine, lease_seconds=30.0), Catalog(engine), artifacts)
    assert list(scratch.iterdir()) == []  # every temp folder removed, whatever happened
    engine.dispose()


class RecordingJobStore(JobStore):
    """The real store; remembers each progress write (to see progress while the job ran)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress_writes: list[tuple[str, float, bool]] = []

    def progress(self, claim: Claim, stage: str, fraction: float) -> bool:
        written = super().progress(claim, stage, fraction)
        self.progress_writes.append((stage, fraction, written))
        return written


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _wait_for(path: Path, thread: threading.Thread) -> int:
    """The pid a sleeping child wrote to ``path`` (fails if the worker ended first)."""
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert thread.is_alive(), "the worker ended before its child started sleeping"
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    while not path.read_text():
        time.sleep(0.01)
    return int(path.read_text())


def _in_thread(worker: Worker, stop: threading.Event | None = None) -> tuple[threading.Thread, list[bool]]:
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(worker.run_once(stop)), daemon=True)
    thread.start()
    return thread, result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count(registry: CollectorRegistry, status: str) -> float | None:
    return registry.get_sample_value("slimserve_optimization_jobs_total", {"status": status})


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_invalid_model_fails_then_a_real_optimization_succeeds(service: Service, tmp_path: Path) -> None:
    bad = service.upload("bad", b"\x08\x07" + np.random.default_rng(0).bytes(4096), REAL_CONFIG)
    model = builders.mlp_onnx(tmp_path / "mlp.onnx")
    good = service.upload("m", model, REAL_CONFIG)
    service.jobs = RecordingJobStore(service.engine, lease_seconds=30.0)
    registry = CollectorRegistry()
    worker = service.worker(task=run_optimization, metrics=JobMetrics(registry))

    assert worker.run_once() and worker.run_once()
    assert not worker.run_once()  # the queue is empty

    failed = service.jobs.get(bad)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.startswith("invalid ONNX model")
    assert service.catalog.get_version("bad", 1).state == "failed"
    assert service.attempt_keys(bad) == []

    job = service.jobs.get(good)
    assert (job.status, job.result_version, job.stage, job.progress) == ("succeeded", 2, "done", 1.0)
    version = service.catalog.get_version("m", 2)
    assert (version.kind, version.state) == ("optimized", "ready")
    assert set(version.files) == {"model.onnx", "report.json", "report.html"}
    for name, ref in version.files.items():
        assert ref.key == f"models/{job.storage_prefix}/jobs/{good}/1/{name}"
        local = tmp_path / "download" / name
        service.artifacts.get_file(ref.key, local)
        assert (local.stat().st_size, _sha256(local)) == (ref.size, ref.sha256)
    report = json.loads((tmp_path / "download" / "report.json").read_text())
    assert version.summary is not None
    assert version.summary["chosen"] == report["chosen"] and version.summary["candidates"] == 1
    assert version.summary["speedup"] > 0

    original = service.catalog.get_version("m", 1)
    assert original.state == "ready" and set(original.files) == {"original.onnx", "data.npz", "model.onnx"}
    service.artifacts.get_file(original.files["model.onnx"].key, tmp_path / "original.onnx")
    assert (tmp_path / "original.onnx").read_bytes() == model.read_bytes()  # the validated ONNX upload

    stages = [stage for stage, _fraction, written in service.jobs.progress_writes if written]
    assert {"baseline", "candidate int8-dynamic", "done"} <= set(stages)
    assert (_count(registry, "succeeded"), _count(registry, "failed")) == (1.0, 1.0)
    assert registry.get_sample_value("slimserve_worker_jobs_in_progress") == 0.0


def test_the_child_environment_holds_no_secrets(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSERVE_DATABASE_URL", "postgresql://admin:db-secret-42@db/slimserve")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-42")
    job_id = service.upload("env", b"env")
    assert service.worker().run_once()
    job = service.jobs.get(job_id)
    assert job.status == "succeeded", job.error
    version = service.catalog.get_version("env", 2)
    report = service.root / "report.json"
    service.artifacts.get_file(version.files["report.json"].key, report)
    seen = json.loads(report.read_text())
    assert seen["env"] and "PATH" in seen["env"]  # the task really reported its environment
    assert "SLIMSERVE_DATABASE_URL" not in seen["env"] and "AWS_SECRET_ACCESS_KEY" not in seen["env"]
    assert "HOME=" in seen["environ"]
    assert "db-secret-42" not in seen["environ"] and "aws-secret-42" not in seen["environ"]
    assert version.summary == {"chosen": "fake", "speedup": 2.0, "not_finite": None}  # cleaned child reply


@pytest.mark.parametrize(
    ("command", "settings", "reason"),
    [
        (b"crash", {}, "optimization crashed (SIGSEGV)"),
        (b"oom", {"job_memory_bytes": 2 * 1024**3}, "optimization ran out of memory (limit 2048 MiB)"),
        pytest.param(
            b"sleep /dev/null",
            {"job_timeout_seconds": 5},
            "optimization timed out after 5 s",
            marks=pytest.mark.slow,  # waits out the time limit
        ),
    ],
    ids=["crash", "out-of-memory", "timeout"],
)
def test_a_failing_child_fails_its_job_and_the_next_job_runs(
    service: Service, command: bytes, settings: dict[str, Any], reason: str
) -> None:
    failing = service.upload("failing", command)
    good = service.upload("good", b"fine")
    registry = CollectorRegistry()
    worker = service.worker(metrics=JobMetrics(registry), **settings)
    assert worker.run_once()
    # The next job's child must not race a short time limit on a busy machine; its other limits stay.
    worker.settings = worker.settings.model_copy(update={"job_timeout_seconds": 600.0})
    assert worker.run_once()
    job = service.jobs.get(failing)
    assert (job.status, job.error) == ("failed", reason)
    assert service.catalog.get_version("failing", 1).state == "pending"  # the model itself was not at fault
    assert service.attempt_keys(failing) == []
    assert service.jobs.get(good).status == "succeeded"
    assert (_count(registry, "failed"), _count(registry, "succeeded")) == (1.0, 1.0)


def test_cancel_while_running_kills_the_child(service: Service) -> None:
    pid_file = service.root / "pid"
    job_id = service.upload("slow", b"sleep " + str(pid_file).encode())
    registry = CollectorRegistry()
    thread, result = _in_thread(service.worker(metrics=JobMetrics(registry)))
    pid = _wait_for(pid_file, thread)
    assert service.jobs.cancel(job_id).cancel_requested
    thread.join(WAIT_S)
    assert result == [True]
    assert service.jobs.get(job_id).status == "cancelled"
    assert _state(pid) is None  # killed and reaped
    assert service.attempt_keys(job_id) == []
    assert _count(registry, "cancelled") == 1.0


def test_stopping_the_worker_mid_job_queues_the_job_again(service: Service) -> None:
    pid_file = service.root / "pid"
    job_id = service.upload("slow", b"sleep " + str(pid_file).encode())
    stop = threading.Event()
    thread, result = _in_thread(service.worker(), stop)
    pid = _wait_for(pid_file, thread)
    stop.set()
    thread.join(WAIT_S)
    assert result == [True]
    job = service.jobs.get(job_id)
    assert (job.status, job.attempts, job.error) == ("queued", 1, "worker stopped")
    assert _state(pid) is None
    retry = service.jobs.claim("another-worker")
    assert retry is not None and retry.job.id == job_id and retry.job.attempts == 2


def test_a_lease_lost_while_running_kills_the_child_and_commits_nothing(service: Service) -> None:
    pid_file = service.root / "pid"
    job_id = service.upload("slow", b"sleep " + str(pid_file).encode())
    registry = CollectorRegistry()
    thread, result = _in_thread(service.worker(metrics=JobMetrics(registry)))
    pid = _wait_for(pid_file, thread)
    service.take_over(job_id)
    thread.join(WAIT_S)
    assert result == [True]
    assert _state(pid) is None
    job = service.jobs.get(job_id)
    assert job.status == "running" and job.result_version is None  # untouched: the new owner's job now
    assert service.attempt_keys(job_id) == []
    assert [_count(registry, s) for s in ("succeeded", "failed", "cancelled")] == [0.0, 0.0, 0.0]


def test_a_lease_that_cannot_be_renewed_for_its_duration_counts_as_lost(service: Service) -> None:
    pid_file = service.root / "pid"
    job_id = service.upload("slow", b"sleep " + str(pid_file).encode())
    beats = 0

    class DatabaseGoneAfterClaim(JobStore):
        def heartbeat(self, claim: Claim) -> Any:
            nonlocal beats
            beats += 1
            raise Unavailable("database unavailable")

    service.jobs = DatabaseGoneAfterClaim(service.engine, lease_seconds=30.0)
    thread, result = _in_thread(service.worker(lease_seconds=1.0))
    thread.join(WAIT_S)  # the child sleeps 600 s: only the worker giving up on its lease ends this early
    assert result == [True] and beats >= 1
    if pid_file.exists():  # the child may be stopped before it even started sleeping
        assert _state(int(pid_file.read_text() or 0)) is None
    assert service.jobs.get(job_id).status == "running"  # left for the lease expiry to reclaim


def test_a_lease_lost_just_before_the_commit_leaves_no_version_and_no_artifacts(service: Service) -> None:
    job_id = service.upload("m", b"fine")
    outer = service

    class TakenOverJustBeforeCommit(JobStore):
        def succeed(self, claim: Claim, **kwargs: Any) -> int | None:
            assert outer.attempt_keys(job_id)  # the outputs were uploaded...
            outer.take_over(job_id)  # ...then another worker took the job over
            return super().succeed(claim, **kwargs)

    service.jobs = TakenOverJustBeforeCommit(service.engine, lease_seconds=30.0)
    assert service.worker().run_once()
    assert service.jobs.get(job_id).status == "running"
    assert [v.number for v in service.catalog.get_model("m").versions] == [1]
    assert "model.onnx" not in service.catalog.get_version("m", 1).files
    assert service.attempt_keys(job_id) == []


def test_storage_full_while_uploading_outputs_fails_the_job(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = service.upload("m", b"fine")
    real_put = service.artifacts.put_file
    calls: list[str] = []

    def put_file(key: str, source: Path, **kwargs: Any) -> Any:
        calls.append(key)
        if len(calls) == 3:  # the third output: two are already stored
            raise StorageFull("no space left on the artifact storage")
        return real_put(key, source, **kwargs)

    monkeypatch.setattr(service.artifacts, "put_file", put_file)
    assert service.worker().run_once()
    job = service.jobs.get(job_id)
    assert (job.status, job.error) == ("failed", "no space left on the artifact storage")
    assert len(calls) == 3 and service.attempt_keys(job_id) == []


def test_storage_unavailable_gives_the_job_back(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = service.upload("m", b"fine")

    def get_file(key: str, dest: Path) -> None:
        raise Unavailable("artifact storage unavailable")

    monkeypatch.setattr(service.artifacts, "get_file", get_file)
    assert service.worker().run_once()
    job = service.jobs.get(job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    assert job.error == "worker could not finish: artifact storage unavailable"


def test_a_corrupted_upload_fails_the_job(service: Service) -> None:
    job_id = service.upload("m", b"fine")
    key = service.catalog.get_version("m", 1).files["data.npz"].key
    (service.artifacts.root / key).write_bytes(b"flipped bits")
    assert service.worker().run_once()
    job = service.jobs.get(job_id)
    assert (job.status, job.error) == ("failed", "the uploaded data file is corrupted in storage")


def test_run_forever_survives_store_errors_and_drains_the_queue(service: Service) -> None:
    first, second = service.upload("a", b"fine"), service.upload("b", b"fine")
    claims = 0

    class FlakyAtFirst(JobStore):
        def claim(self, worker_id: str) -> Claim | None:
            nonlocal claims
            claims += 1
            if claims <= 2:
                raise Unavailable("database unavailable")
            return super().claim(worker_id)

    service.jobs = FlakyAtFirst(service.engine, lease_seconds=30.0)
    stop = threading.Event()
    worker = service.worker(poll_seconds=0.01)
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not all(service.jobs.get(j).status == "succeeded" for j in (first, second)):
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    stop.set()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert claims >= 4  # two failures, then the two jobs


# ---- version 1 served before the job ends -------------------------------------------------------


def _wait_ready(service: Service, name: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + WAIT_S
    while service.catalog.get_version(name, 1).state != "ready":
        assert thread.is_alive(), "the worker ended before version 1 was ready"
        assert time.monotonic() < deadline, "version 1 never became ready"
        time.sleep(0.02)


def test_the_validated_original_is_served_while_the_job_runs(service: Service) -> None:
    pid_file = service.root / "pid"
    job_id = service.upload("early", b"early " + str(pid_file).encode())
    thread, result = _in_thread(service.worker())
    _wait_for(pid_file, thread)
    _wait_ready(service, "early", thread)
    assert service.jobs.get(job_id).status == "running"
    version = service.catalog.get_version("early", 1)
    ref = version.files["model.onnx"]
    assert (service.artifacts.root / ref.key).read_bytes() == b"validated early"
    assert f"/jobs/{job_id}/early-1/" in ref.key
    assert version.summary is not None
    assert (version.summary["metric"], version.summary["accuracy"], version.summary["speedup"]) == ("top1", 0.875, 1.0)
    assert service.catalog.get_model("early").default_version == 1
    assert service.jobs.cancel(job_id).cancel_requested
    thread.join(WAIT_S)
    assert result == [True] and service.jobs.get(job_id).status == "cancelled"
    after = service.catalog.get_version("early", 1)
    assert (after.state, after.files["model.onnx"]) == ("ready", ref)  # cancelling the job keeps the original
    assert (service.artifacts.root / ref.key).is_file()


def test_an_early_original_is_kept_by_the_final_commit(service: Service) -> None:
    job_id = service.upload("early", b"early")
    assert service.worker().run_once()
    assert service.jobs.get(job_id).status == "succeeded"
    ref = service.catalog.get_version("early", 1).files["model.onnx"]
    assert (service.artifacts.root / ref.key).read_bytes() == b"validated early"  # not uploaded a second time
    uploaded = {path.name for path in service.attempt_keys(job_id)}
    assert uploaded == {"model.onnx", "report.json", "report.html"}
    assert service.catalog.get_model("early").default_version == 2


def test_early_publishing_that_fails_is_left_to_the_final_commit(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = service.upload("early", b"early")
    real_put = service.artifacts.put_file

    def put_file(key: str, source: Path, **kwargs: Any) -> Any:
        if "/early-" in key:
            raise Unavailable("the artifact storage is not answering", retry_after=5)
        return real_put(key, source, **kwargs)

    monkeypatch.setattr(service.artifacts, "put_file", put_file)
    assert service.worker().run_once()
    assert service.jobs.get(job_id).status == "succeeded"
    ref = service.catalog.get_version("early", 1).files["model.onnx"]
    assert (service.artifacts.root / ref.key).read_bytes() == b"validated original"
    assert not [path for path in service.attempt_keys(job_id) if "early-" in str(path)]


def test_a_model_error_after_early_publishing_leaves_the_original_served(service: Service) -> None:
    job_id = service.upload("early", b"early invalid")
    assert service.worker().run_once()
    job = service.jobs.get(job_id)
    assert (job.status, job.error) == ("failed", "the model is not valid after all")
    assert service.catalog.get_version("early", 1).state == "ready"  # it was validated and served: it stays
