"""service.jobs.store: claims, leases (on an injected clock), retries, cancels and guarded commits.

Every test runs on a real SQLite file and on a real PostgreSQL database (skipped without one).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from service.errors import NotFound, Unavailable
from service.jobs.records import Claim, JobRecord
from service.jobs.store import JobStore
from service.storage.catalog import Catalog, FileRef
from service.storage.db import create_db_engine, jobs, migrate, read_connection, versions, write_transaction
from tests.pg import PostgresServer, database_url, postgres_server, start_postgres  # noqa: F401  (fixtures)

LEASE = 30.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Env:
    """One database with a catalog and a job store on a fake clock."""

    engine: Engine
    clock: FakeClock
    catalog: Catalog
    store: JobStore

    def upload(
        self, name: str, *, max_attempts: int = 3, key: str | None = None, deploy: bool | None = None
    ) -> JobRecord:
        files = {
            "original.onnx": FileRef(f"models/{name}/original.onnx", 10, "a" * 64),
            "data.npz": FileRef(f"models/{name}/data.npz", 20, "b" * 64),
        }
        _, job, _ = self.catalog.create_upload(
            name=name,
            storage_prefix=f"{name}-prefix",
            original_files=files,
            source_format="onnx",
            job_config={"name": name} if deploy is None else {"name": name, "deploy": deploy},
            max_attempts=max_attempts,
            idempotency_key=key,
        )
        self.clock.advance(1)
        return job


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:  # noqa: F811
    engine = create_db_engine(database_url)
    migrate(engine)
    clock = FakeClock()
    yield Env(engine, clock, Catalog(engine, clock=clock), JobStore(engine, LEASE, clock=clock))
    engine.dispose()


def _claim(env: Env, worker: str = "w1") -> Claim:
    claim = env.store.claim(worker)
    assert claim is not None
    return claim


def _optimized() -> dict[str, FileRef]:
    return {name: FileRef(f"jobs/x/1/{name}", 5, "c" * 64) for name in ("model.onnx", "report.json", "report.html")}


def _succeed(env: Env, claim: Claim) -> int | None:
    return env.store.succeed(
        claim,
        optimized_files=_optimized(),
        summary={"chosen": "int8", "speedup": 2.0},
        original_files={"model.onnx": FileRef("jobs/x/1/original.onnx", 7, "d" * 64)},
    )


def _version_count(env: Env) -> int:
    with read_connection(env.engine) as conn:
        return int(conn.execute(select(func.count()).select_from(versions)).scalar_one())


def test_claim_takes_the_oldest_queued_job_with_a_lease(env: Env) -> None:
    first, second = env.upload("a"), env.upload("b")
    claim = _claim(env, "w1")
    assert claim.job.id == first.id and claim.token == "w1:1"
    assert (claim.job.status, claim.job.attempts, claim.job.started_at) == ("running", 1, env.clock.now)
    assert (claim.job.model_name, claim.job.storage_prefix, claim.job.config) == ("a", "a-prefix", {"name": "a"})
    assert _claim(env, "w2").job.id == second.id
    assert env.store.claim("w3") is None
    with pytest.raises(ValueError):
        env.store.claim("")


def test_get_unknown_job_is_not_found(env: Env) -> None:
    env.upload("a")
    for job_id in ("0" * 32, "x" * 5000):
        with pytest.raises(NotFound, match=r"^job not found$"):
            env.store.get(job_id)


def test_heartbeat_keeps_the_lease_alive(env: Env) -> None:
    job = env.upload("a")
    claim = _claim(env)
    for _ in range(3):
        env.clock.advance(LEASE * 0.8)
        assert env.store.heartbeat(claim) == "ok"
    assert env.store.claim("w2") is None  # not reclaimed: the lease was renewed each time
    assert env.store.reclaim_expired() == 0
    assert env.store.get(job.id).status == "running"


def test_expired_lease_is_reclaimed_and_the_old_worker_can_commit_nothing(env: Env) -> None:
    job = env.upload("a")
    lost = _claim(env, "w1")
    env.clock.advance(LEASE + 1)
    taken = _claim(env, "w2")
    assert taken.job.id == job.id and taken.token == "w2:2" and taken.job.attempts == 2
    assert taken.job.error == "lease expired on attempt 1 of 3"
    assert env.store.heartbeat(lost) == "lost"
    assert env.store.progress(lost, "quantize", 0.5) is False
    assert _succeed(env, lost) is None
    assert env.store.fail(lost, "boom", original_state="failed") is False
    assert env.store.release(lost, "stopping") is False
    assert env.store.finish_cancelled(lost) is False
    after = env.store.get(job.id)
    assert (after.status, after.stage, after.attempts) == ("running", "starting", 2)
    assert _version_count(env) == 1
    assert env.catalog.get_version("a", 1).state == "pending"
    assert env.store.heartbeat(taken) == "ok"


def test_job_fails_after_max_attempts_of_lost_workers(env: Env) -> None:
    job = env.upload("a", max_attempts=2)
    _claim(env, "w1")
    env.clock.advance(LEASE + 1)
    _claim(env, "w2")
    env.clock.advance(LEASE + 1)
    assert env.store.reclaim_expired() == 1
    failed = env.store.get(job.id)
    assert (failed.status, failed.error, failed.attempts) == ("failed", "worker lost 2 times", 2)
    assert failed.finished_at == env.clock.now and failed.updated_at == env.clock.now
    assert env.store.claim("w3") is None


def test_cancel_a_queued_job_at_once(env: Env) -> None:
    job = env.upload("a")
    cancelled = env.store.cancel(job.id)
    assert (cancelled.status, cancelled.finished_at) == ("cancelled", env.clock.now)
    assert env.store.claim("w1") is None
    env.clock.advance(5)
    assert env.store.cancel(job.id) == cancelled  # finished: unchanged
    with pytest.raises(NotFound):
        env.store.cancel("f" * 32)


def test_cancel_a_running_job_through_its_worker(env: Env) -> None:
    job = env.upload("a")
    claim = _claim(env)
    requested = env.store.cancel(job.id)
    assert (requested.status, requested.cancel_requested) == ("running", True)
    assert env.store.heartbeat(claim) == "cancel"
    assert env.store.finish_cancelled(claim) is True
    assert env.store.finish_cancelled(claim) is True  # a re-run of its own landed commit
    done = env.store.get(job.id)
    assert (done.status, done.finished_at) == ("cancelled", env.clock.now)
    assert env.store.cancel(job.id) == done
    assert _succeed(env, claim) is None


def test_cancel_a_running_job_whose_worker_died(env: Env) -> None:
    job = env.upload("a")
    _claim(env)
    env.store.cancel(job.id)
    env.clock.advance(LEASE + 1)
    assert env.store.claim("w2") is None  # reclaimed as cancelled, not retried
    assert env.store.get(job.id).status == "cancelled"


def test_progress_is_recorded_and_clamped(env: Env) -> None:
    job = env.upload("a")
    claim = _claim(env)
    env.clock.advance(2)
    assert env.store.progress(claim, "quantize", 0.25) is True
    seen = env.store.get(job.id)
    assert (seen.stage, seen.progress, seen.updated_at) == ("quantize", 0.25, env.clock.now)
    env.store.progress(claim, "evaluate\nsecond line", 7.0)
    assert (env.store.get(job.id).stage, env.store.get(job.id).progress) == ("evaluate", 1.0)
    env.store.progress(claim, "x" * 500, float("nan"))
    assert (len(env.store.get(job.id).stage), env.store.get(job.id).progress) == (64, 0.0)


def test_succeed_commits_one_new_version_even_when_called_twice(env: Env) -> None:
    job = env.upload("a")
    claim = _claim(env)
    env.clock.advance(3)
    assert _succeed(env, claim) == 2
    assert _succeed(env, claim) == 2  # the same claim again: its own result, nothing new
    assert _version_count(env) == 2
    done = env.store.get(job.id)
    assert (done.status, done.result_version, done.progress, done.error) == ("succeeded", 2, 1.0, None)
    assert done.finished_at == env.clock.now
    original = env.catalog.get_version("a", 1)
    assert (original.kind, original.state) == ("original", "ready")
    assert set(original.files) == {"original.onnx", "data.npz", "model.onnx"}
    assert original.files["model.onnx"] == FileRef("jobs/x/1/original.onnx", 7, "d" * 64)
    optimized = env.catalog.get_version("a", 2)
    assert (optimized.kind, optimized.state, optimized.files) == ("optimized", "ready", _optimized())
    assert optimized.summary == {"chosen": "int8", "speedup": 2.0}
    assert env.store.heartbeat(claim) == "lost"
    assert env.store.progress(claim, "late", 0.1) is False
    assert env.store.fail(claim, "late") is False
    assert env.store.get(job.id).status == "succeeded"


def test_succeed_deploys_the_new_version_by_default(env: Env) -> None:
    env.upload("a")
    assert env.catalog.get_model("a").default_version is None
    assert _succeed(env, _claim(env)) == 2
    assert env.catalog.get_model("a").default_version == 2


def test_succeed_without_deploy_keeps_the_default_or_serves_the_original(env: Env) -> None:
    env.upload("a", deploy=False)
    assert _succeed(env, _claim(env)) == 2
    assert env.catalog.get_model("a").default_version == 1  # it had none: the original
    second = env.upload("b", deploy=True)
    third = env.upload("c", deploy=False)
    assert _succeed(env, _claim(env)) == 2 and env.store.get(second.id).status == "succeeded"
    env.catalog.set_default_version("b", 1)  # a rollback stays put through a later no-deploy job
    with write_transaction(env.engine) as conn:  # b's next job, deploy off (a re-optimization)
        conn.execute(update(jobs).where(jobs.c.id == third.id).values(model_id=_model_id(env, "b")))
    assert _succeed(env, _claim(env)) == 3
    assert env.catalog.get_model("b").default_version == 1


def test_publish_original_serves_version_1_only_while_the_claim_owns_the_job(env: Env) -> None:
    env.upload("a")
    claim = _claim(env)
    early = {"model.onnx": FileRef("jobs/x/early-1/model.onnx", 7, "e" * 64)}
    assert env.store.publish_original(claim, early, {"metric": "top1", "accuracy": 0.5})
    assert env.store.publish_original(claim, early, {"metric": "top1", "accuracy": 0.5})  # idempotent
    original = env.catalog.get_version("a", 1)
    assert (original.state, original.files["model.onnx"]) == ("ready", early["model.onnx"])
    assert original.summary is not None
    assert (original.summary["metric"], original.summary["accuracy"]) == ("top1", 0.5)
    assert env.catalog.get_model("a").default_version == 1
    assert env.store.get(claim.job.id).status == "running"
    with write_transaction(env.engine) as conn:  # another worker took the job over
        conn.execute(update(jobs).where(jobs.c.id == claim.job.id).values(lease_owner="thief:2"))
    env.upload("b")
    lost = _claim(env)
    with write_transaction(env.engine) as conn:
        conn.execute(update(jobs).where(jobs.c.id == lost.job.id).values(lease_owner="thief:3"))
    assert not env.store.publish_original(lost, early, {})
    assert env.catalog.get_version("b", 1).state == "pending"
    assert env.catalog.get_model("b").default_version is None


def _model_id(env: Env, name: str) -> int:
    return env.catalog.get_model(name).id


def test_fail_records_one_line_and_optionally_fails_the_original(env: Env) -> None:
    job = env.upload("a")
    other = env.upload("b")
    claim = _claim(env)
    assert env.store.fail(claim, "invalid ONNX model\nTraceback (most recent call last): ...", original_state="failed")
    assert env.store.fail(claim, "invalid ONNX model") is True  # a re-run of its own landed commit
    failed = env.store.get(job.id)
    assert (failed.status, failed.error, failed.finished_at) == ("failed", "invalid ONNX model", env.clock.now)
    assert env.catalog.get_version("a", 1).state == "failed"
    assert env.catalog.get_version("b", 1).state == "pending"
    assert _succeed(env, claim) is None
    claim_b = _claim(env)
    assert claim_b.job.id == other.id and env.store.fail(claim_b, "") is True
    assert env.store.get(other.id).error == "failed"
    assert env.catalog.get_version("b", 1).state == "pending"


def test_release_requeues_while_attempts_remain_then_fails(env: Env) -> None:
    job = env.upload("a", max_attempts=2)
    first = _claim(env)
    assert env.store.release(first, "worker stopped") is True
    queued = env.store.get(job.id)
    assert (queued.status, queued.error, queued.attempts, queued.finished_at) == ("queued", "worker stopped", 1, None)
    second = _claim(env, "w2")
    assert second.token == "w2:2"
    assert env.store.release(second, "worker stopped") is True
    failed = env.store.get(job.id)
    assert (failed.status, failed.error, failed.finished_at) == ("failed", "worker stopped", env.clock.now)
    assert env.store.claim("w3") is None


def test_release_of_a_job_with_a_cancel_request_cancels_it(env: Env) -> None:
    job = env.upload("a")
    claim = _claim(env)
    env.store.cancel(job.id)
    assert env.store.release(claim, "worker stopped") is True
    assert env.store.get(job.id).status == "cancelled"


def test_every_change_bumps_updated_at(env: Env) -> None:
    job = env.upload("a")
    seen = [env.store.get(job.id).updated_at]
    claim = _claim(env)
    for step in (
        lambda: env.store.heartbeat(claim),
        lambda: env.store.progress(claim, "s", 0.5),
        lambda: env.store.cancel(job.id),
        lambda: _succeed(env, claim),
    ):
        env.clock.advance(1)
        step()
        seen.append(env.store.get(job.id).updated_at)
    assert seen == sorted(set(seen)) and seen[-1] == env.clock.now


def test_counts_every_status(env: Env) -> None:
    assert env.store.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    jobs_ = [env.upload(name) for name in "abcde"]
    env.store.cancel(jobs_[4].id)
    _succeed(env, _claim(env))
    env.store.fail(_claim(env), "bad")
    _claim(env)
    assert env.store.counts() == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 1}


def test_a_commit_never_lands_for_a_token_that_lost_its_lease_in_the_database(env: Env) -> None:
    """Another claimer took over (lease_owner rewritten behind this worker's back)."""
    job = env.upload("a")
    claim = _claim(env)
    with write_transaction(env.engine) as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(lease_owner="intruder:2"))
    assert _succeed(env, claim) is None
    assert _version_count(env) == 1
    assert env.store.get(job.id).status == "running"


def test_locked_sqlite_gives_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    engine = create_db_engine(f"sqlite:///{path}", busy_timeout_s=0.05)
    migrate(engine)
    clock = FakeClock()
    env = Env(engine, clock, Catalog(engine, clock=clock), JobStore(engine, LEASE, clock=clock))
    job = env.upload("a")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer holding the lock past the busy timeout
    try:
        with pytest.raises(Unavailable, match=r"^database unavailable$"):
            env.store.claim("w1")
        with pytest.raises(Unavailable):
            env.store.cancel(job.id)
        assert env.store.get(job.id).status == "queued"  # reads still work in WAL mode
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _claim(env).job.id == job.id
    engine.dispose()


@pytest.mark.slow
def test_postgres_down_gives_unavailable_and_recovers() -> None:
    server: PostgresServer = start_postgres()  # its own server: this test stops it
    try:
        engine = create_db_engine(server.create_database())
        migrate(engine)
        clock = FakeClock()
        env = Env(engine, clock, Catalog(engine, clock=clock), JobStore(engine, LEASE, clock=clock))
        job = env.upload("a")
        server.stop()
        for call in (lambda: env.store.get(job.id), lambda: env.store.claim("w1"), env.store.counts):
            with pytest.raises(Unavailable, match=r"^database unavailable$"):
                call()
        server.start()
        assert _claim(env).job.id == job.id  # the pool dropped its dead connections
        engine.dispose()
    finally:
        server.close()
