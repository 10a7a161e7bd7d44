"""Faults from RELIABILITY.md against real processes: killed workers, restarts, SIGTERM, a full disk,
an out-of-memory job and a locked database.

Each test has its own SLIMSERVE_HOME and processes (they kill things). Leases are short so that a
dead worker's job is reclaimed within seconds. Every test ends with the four invariants
(tests/faults/invariants.py) on what the fault left; the uploads it got acknowledged are recorded in
a ``Ledger``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.builders import mlp_onnx
from tests.e2e.conftest import (
    MlpFiles,
    assert_clean_reason,
    assert_error,
    home_files,
    job_config,
    job_row,
    model_names,
    serving,
    settings_env,
    stray_files,
    upload,
    version_rows,
)
from tests.faults.invariants import Ledger, assert_invariants, read_state
from tests.serverproc import ROOT, Proc, running, service_env, start_server, start_worker, wait_for, wait_job
from tests.tmpfs import small_tmpfs

#: Short leases: a dead worker's job is reclaimed a few seconds later.
FAULT = {"lease_seconds": "3", "heartbeat_seconds": "0.5", "poll_seconds": "0.2"}
#: A job that runs long enough (several seconds) to be interrupted while running.
SLOWER = {"latency_seconds": 1.0}


def status_of(url: str, job_id: str) -> str:
    """The job's status over HTTP."""
    return str(httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["status"])


def submit(url: str, mlp_files: MlpFiles, name: str, ledger: Ledger | None = None, **overrides: object) -> str:
    """Upload the tiny MLP as ``name`` (recorded in ``ledger`` when given); its job id."""
    response = upload(url, mlp_files.model, mlp_files.data, job_config(name, **overrides))
    assert response.status_code == 202, response.text
    if ledger is not None:
        ledger.acknowledged(response, name, mlp_files.model, mlp_files.data)
    return str(response.json()["job"]["id"])


def wait_running(url: str, job_id: str, timeout: float = 60.0) -> None:
    """Until the job is ``running`` (fails at once if it finished instead)."""

    def running_now() -> bool:
        status = status_of(url, job_id)
        assert status in ("queued", "running"), f"job ended {status} before the fault could be injected"
        return status == "running"

    wait_for(running_now, timeout=timeout)


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid``."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (zombies count as gone)."""
    out = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_two_versions(home: Path, name: str, job_id: str, killed_attempt: int | None = None) -> None:
    """Exactly the original and one optimized version, every file there, none from ``killed_attempt``."""
    rows = version_rows(home, name)
    assert [(r["number"], r["kind"], r["state"]) for r in rows] == [(1, "original", "ready"), (2, "optimized", "ready")]
    keys = [ref["key"] for row in rows for ref in row["files"].values()]
    if killed_attempt is not None:
        stale = [key for key in keys if f"{job_id}/{killed_attempt}/" in key]
        assert not stale, f"rows point at the killed attempt's files: {stale}"
    artifacts = home / "artifacts"
    missing = [key for key in keys if not (artifacts / key).is_file()]
    assert not missing, f"rows point at missing files: {missing}"


# --------------------------------------------------------------------------- killed workers


@pytest.mark.slow
def test_sigkill_worker_mid_job_is_retried_by_the_next_worker(tmp_path: Path, mlp_files: MlpFiles) -> None:
    home = tmp_path / "home"
    ledger = Ledger()
    with serving(home, run_worker="false", **FAULT) as server:
        job_id = submit(server.url, mlp_files, "killed", ledger, **SLOWER)
        with running(start_worker(home, name="doomed", env=settings_env(**FAULT))) as doomed:
            wait_running(server.url, job_id)
            wait_for(lambda: bool(descendants(doomed.popen.pid)), timeout=30)  # the sandbox child started
            children = descendants(doomed.popen.pid)
            doomed.kill()
        assert status_of(server.url, job_id) == "running"  # until the lease expires
        with running(start_worker(home, name="rescuer", env=settings_env(**FAULT))):
            job = wait_job(server.url, job_id, timeout=180)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        assert job["version"] == 2
        assert_two_versions(home, "killed", job_id, killed_attempt=1)
        # the killed worker's sandbox child must not live on as an orphan burning CPU and memory
        orphans = alive(children)
        for proc in orphans:
            proc.kill()
        assert not orphans, f"the killed worker's children outlived it: {[p.pid for p in orphans]}"
    assert_invariants(home, ledger, mlp_files)


@dataclass
class HalfDone:
    """A worker SIGKILLed at the moment it would commit its written artifacts, then a second worker's retry."""

    home: Path
    job_id: str
    ledger: Ledger
    returncode: int
    log: str
    written: set[str]
    row_after_kill: dict[str, Any]
    job: dict[str, Any]
    model: dict[str, Any]


@pytest.fixture(scope="module")
def half_done(tmp_path_factory: pytest.TempPathFactory, mlp_files: MlpFiles) -> HalfDone:
    """The scenario runs once; the test below checks it, and the next one the killed attempt's files."""
    tmp_path = tmp_path_factory.mktemp("half-done")
    home = tmp_path / "home"
    ledger = Ledger()
    with serving(home, run_worker="false", **FAULT) as server:
        job_id = submit(server.url, mlp_files, "half-done", ledger)
        uploads_only = home_files(home)
        log = (tmp_path / "kill-on-succeed.log").open("wb")
        dying = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.kill_on_succeed"],
            cwd=ROOT,
            env=service_env(home, **FAULT),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            returncode = dying.wait(timeout=180)
        finally:
            dying.kill()
            log.close()
        written = home_files(home) - uploads_only
        row_after_kill = job_row(home, job_id)
        job: dict[str, Any] = {}
        model: dict[str, Any] = {}
        if returncode == -9:
            with running(start_worker(home, name="finisher", env=settings_env(**FAULT))):
                job = wait_job(server.url, job_id, timeout=180)
            model = httpx.get(f"{server.url}/v1/models/half-done", timeout=30).json()
    text = (tmp_path / "kill-on-succeed.log").read_text()[-3000:]
    return HalfDone(home, job_id, ledger, returncode, text, written, row_after_kill, job, model)


def killed_attempt_prefix(done: HalfDone) -> str:
    """``models/<prefix>/jobs/<job>/1/``: where the killed attempt wrote its outputs."""
    (storage_prefix,) = [m["storage_prefix"] for m in read_state(done.home).models if m["name"] == "half-done"]
    return f"models/{storage_prefix}/jobs/{done.job_id}/1/"


@pytest.mark.slow
def test_sigkill_after_artifacts_before_commit_ends_with_one_version(half_done: HalfDone, mlp_files: MlpFiles) -> None:
    home, job_id = half_done.home, half_done.job_id
    assert half_done.returncode == -9, half_done.log
    written = half_done.written
    assert any(name.endswith("model.onnx") for name in written), f"no artifact was written first: {written}"
    assert half_done.row_after_kill["status"] == "running"
    job = half_done.job
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["version"] == 2
    assert_two_versions(home, "half-done", job_id, killed_attempt=1)
    model = half_done.model
    assert [v["number"] for v in model["versions"]] == [1, 2]
    assert_invariants(home, half_done.ledger.copy(), mlp_files)  # the killed attempt's outputs included


@pytest.mark.slow
def test_after_the_retry_no_file_of_the_killed_attempt_remains(half_done: HalfDone) -> None:
    """Once the retry succeeded, the killed attempt's outputs (written, never committed) are gone: the
    retry deleted them before it ran."""
    assert half_done.job.get("status") == "succeeded", half_done.job
    prefix = killed_attempt_prefix(half_done)
    left = sorted(name for name in home_files(half_done.home) if name.startswith(f"artifacts/{prefix}"))
    assert left == [], f"files of the killed attempt without a row: {left}"


@pytest.mark.slow
def test_restart_runs_queued_jobs_and_reclaims_the_running_one(tmp_path: Path, mlp_files: MlpFiles) -> None:
    home = tmp_path / "home"
    ledger = Ledger()
    with serving(home, run_worker="false", **FAULT) as server:
        first = submit(server.url, mlp_files, "first", ledger, **SLOWER)
        second = submit(server.url, mlp_files, "second", ledger)
        assert status_of(server.url, second) == "queued"
        with running(start_worker(home, name="doomed", env=settings_env(**FAULT))) as doomed:
            wait_running(server.url, first)
            doomed.kill()
        assert status_of(server.url, second) == "queued"
    assert job_row(home, first)["status"] == "running"
    with serving(home, **FAULT) as restarted:
        jobs = {job_id: wait_job(restarted.url, job_id, timeout=180) for job_id in (first, second)}
    assert jobs[first]["status"] == "succeeded", jobs[first]
    assert jobs[first]["attempts"] == 2
    assert jobs[second]["status"] == "succeeded", jobs[second]
    assert jobs[second]["attempts"] == 1
    assert_two_versions(home, "first", first, killed_attempt=1)
    assert_two_versions(home, "second", second)
    assert_invariants(home, ledger, mlp_files)


@pytest.mark.slow
def test_sigterm_hands_the_running_job_back_and_exits_0(tmp_path: Path, mlp_files: MlpFiles) -> None:
    home = tmp_path / "home"
    ledger = Ledger()
    server = start_server(home, env=settings_env(**FAULT))
    try:
        job_id = submit(server.url, mlp_files, "interrupted", ledger, **SLOWER)
        wait_running(server.url, job_id)
        children = descendants(server.popen.pid)
        server.popen.terminate()
        code = server.popen.wait(timeout=45)  # the grace period is 30 s; a hang raises here
    finally:
        server.kill()
    row = job_row(home, job_id)
    assert row["status"] == "queued", row
    assert row["lease_owner"] is None
    assert not alive(children), "the optimization child outlived the server"
    with serving(home, **FAULT) as restarted:
        job = wait_job(restarted.url, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert_two_versions(home, "interrupted", job_id, killed_attempt=1)
    assert_invariants(home, ledger, mlp_files)
    # checked last so that the hand-back above is verified whatever the exit code
    assert code == 0, f"SIGTERM: exit code {code}, not 0\n{server.output()[-3000:]}"


# --------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """SLIMSERVE_HOME whose ``artifacts`` folder is a 4 MiB tmpfs (unmounted afterwards)."""
    home = tmp_path / "home"
    with small_tmpfs(home / "artifacts", "4m"):
        yield home


def used_bytes(folder: Path) -> int:
    """Bytes in use on the filesystem holding ``folder``."""
    stat = os.statvfs(folder)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


@pytest.mark.slow
def test_disk_full_during_upload_is_507_and_leaves_nothing(
    small_disk: Path, tmp_path: Path, mlp_files: MlpFiles
) -> None:
    home = small_disk
    ledger = Ledger()
    big = mlp_onnx(tmp_path / "big.onnx", hidden=75_000)  # about 6 MB of weights
    assert big.stat().st_size > 5_000_000
    with serving(home, run_worker="false") as server:
        baseline = used_bytes(home / "artifacts")
        response = upload(server.url, big, mlp_files.data, job_config("too-big-for-disk"))
        assert_error(response, 507, home)
        assert model_names(home) == set()
        assert stray_files(home) == []
        assert home_files(home) == set(), sorted(home_files(home))
        assert used_bytes(home / "artifacts") <= baseline + 64 * 1024
        assert httpx.get(f"{server.url}/v1/health", timeout=10).status_code == 200
        small = upload(server.url, mlp_files.model, mlp_files.data, job_config("fits"))
        assert small.status_code == 202, small.text
        ledger.acknowledged(small, "fits", mlp_files.model, mlp_files.data)
        assert model_names(home) == {"fits"}
        assert stray_files(home) == []
    assert_invariants(home, ledger, mlp_files)  # restarted on the same small disk


# --------------------------------------------------------------------------- out of memory


@pytest.fixture(scope="module")
def oom_ledger() -> Ledger:
    """The uploads acknowledged by ``oom_server`` across this module's tests (they share its home)."""
    return Ledger()


@pytest.fixture(scope="module")
def oom_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """No in-process worker: each test runs a standalone worker with its own memory limit."""
    home = tmp_path_factory.mktemp("oom") / "home"
    with serving(home, run_worker="false", **FAULT) as proc:
        proc.extra["home"] = str(home)
        yield proc


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["150000000", "200000000", "250000000"])
def test_out_of_memory_fails_the_job_with_the_reason(
    oom_server: Proc, oom_ledger: Ledger, mlp_files: MlpFiles, limit: str
) -> None:
    home = Path(oom_server.extra["home"])
    name = f"starved-{limit[:3]}"
    job_id = submit(oom_server.url, mlp_files, name, oom_ledger)
    with running(start_worker(home, name=f"tight-{limit}", env=settings_env(job_memory_bytes=limit, **FAULT))):
        job = wait_job(oom_server.url, job_id, timeout=180)
    if job["status"] == "succeeded":
        pytest.skip(f"the optimizer fits in {limit} bytes of address space on this machine")
    assert job["status"] == "failed", job
    reason = job["error"]
    problems = []
    try:
        assert_clean_reason(reason)
    except AssertionError as exc:
        problems.append(str(exc).splitlines()[0])
    if not any(word in str(reason).lower() for word in ("memory", "crash", "killed", "signal")):
        problems.append(f"the reason does not say the job ran out of memory: {reason}")
    states = [(v["number"], v["state"]) for v in version_rows(home, name)]
    if states != [(1, "pending")]:
        problems.append(f"an out-of-memory run condemned the (valid) model: versions {states}")
    assert not problems, "\n".join(problems)
    assert_invariants(home, oom_ledger, mlp_files, server=oom_server, worker_running=False)


@pytest.mark.slow
def test_after_out_of_memory_a_worker_with_normal_limits_runs_the_next_job(
    oom_server: Proc, oom_ledger: Ledger, mlp_files: MlpFiles
) -> None:
    home = Path(oom_server.extra["home"])
    job_id = submit(oom_server.url, mlp_files, "fed", oom_ledger)
    with running(start_worker(home, name="normal", env=settings_env(**FAULT))):
        job = wait_job(oom_server.url, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert oom_server.popen.poll() is None
    assert_invariants(home, oom_ledger, mlp_files, server=oom_server, worker_running=False)


# --------------------------------------------------------------------------- database locked


@pytest.mark.slow
def test_locked_database_answers_503_and_recovers(tmp_path: Path, mlp_files: MlpFiles) -> None:
    home = tmp_path / "home"
    ledger = Ledger()
    with serving(home, run_worker="false", database_busy_timeout_seconds="0.5") as server:
        holder = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.hold_sqlite_lock", str(home / "slimserve.db")],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            health: list[int] = []
            stop = threading.Event()

            def probe() -> None:
                while not stop.is_set():
                    health.append(httpx.get(f"{server.url}/v1/health", timeout=10).status_code)
                    stop.wait(0.5)

            with ThreadPoolExecutor(2) as pool:
                prober = pool.submit(probe)
                pending = pool.submit(upload, server.url, mlp_files.model, mlp_files.data, job_config("locked-out"))
                response = pending.result(timeout=120)
                stop.set()
                prober.result(timeout=30)
            assert_error(response, 503, home)
            retry_after = response.headers.get("retry-after")
            assert retry_after is not None and retry_after.isdigit(), response.headers
            assert health and set(health) == {200}, health
            assert model_names(home) == set()
            assert stray_files(home) == []
            assert home_files(home) == set(), sorted(home_files(home))
        finally:
            if holder.poll() is None and holder.stdin is not None:
                holder.stdin.write("\n")
                holder.stdin.flush()
            holder.wait(timeout=30)
        response = upload(server.url, mlp_files.model, mlp_files.data, job_config("after-lock"))
        assert response.status_code == 202, response.text
        ledger.acknowledged(response, "after-lock", mlp_files.model, mlp_files.data)
        assert model_names(home) == {"after-lock"}
    assert_invariants(home, ledger, mlp_files)
