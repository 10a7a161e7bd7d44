"""Real ``slimserve serve`` / ``slimserve worker`` processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

#: Fast optimizer options for tests: one recipe, short timings, no memory probe.
FAST_JOB = {"techniques": ["int8-dynamic"], "latency_seconds": 0.2, "fallback": False, "measure_memory": False}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(home: Path, **settings: str) -> dict[str, str]:
    """The environment of a service process: ``SLIMSERVE_HOME``, no drain pause, plus ``SLIMSERVE_<KEY>`` overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    env["SLIMSERVE_HOME"] = str(home)
    env["SLIMSERVE_LOG_LEVEL"] = "warning"
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows what happened up to now (as in the container image)
    # No not-ready pause before stopping (5 s by default, for load balancers): tests that check
    # draining set it themselves; every other server stop would sleep for nothing.
    env["SLIMSERVE_DRAIN_SECONDS"] = "0"
    env.update({f"SLIMSERVE_{key.upper()}": value for key, value in settings.items()})
    return env


@dataclass
class Proc:
    """A running service process and where its output goes."""

    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return int(self.popen.returncode)

    def kill(self) -> None:
        """SIGKILL, no grace."""
        self.stop(signal.SIGKILL, timeout=10)


def start_server(home: Path, *, port: int | None = None, env: Mapping[str, str] | None = None, **settings: str) -> Proc:
    """Start ``slimserve serve`` and wait until ``/v1/health`` answers (raises with its log if it dies)."""
    port = port or free_port()
    log = home.parent / f"{home.name}-server-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    full_env = {**service_env(home, **settings), **(env or {})}
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc = Proc(popen, log, url=f"http://127.0.0.1:{port}")
    try:
        wait_http(popen, f"{proc.url}/v1/health", "server", proc.output, timeout=60)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def wait_http(
    popen: subprocess.Popen[bytes], url: str, what: str, output: Callable[[], str], timeout: float = 60.0
) -> None:
    """Until ``url`` answers 200; RuntimeError with the end of ``output()`` if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{what} exited with {popen.returncode}:\n{output()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up:\n{output()[-3000:]}")


def start_worker(home: Path, *, env: Mapping[str, str] | None = None, name: str = "worker", **settings: str) -> Proc:
    """Start ``slimserve worker`` (no readiness signal: it simply starts claiming)."""
    log = home.parent / f"{home.name}-{name}.log"
    home.mkdir(parents=True, exist_ok=True)
    full_env = {**service_env(home, **settings), **(env or {})}
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Proc(popen, log)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    """Stop ``proc`` at the end of the block, whatever happens."""
    try:
        yield proc
    finally:
        proc.kill()


def wait_job(url: str, job_id: str, *, headers: Mapping[str, str] | None = None, timeout: float = 180.0) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until a final status; the job's JSON."""
    deadline = time.monotonic() + timeout
    final = {"succeeded", "failed", "cancelled"}
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=dict(headers or {}), timeout=10).json()
        if job.get("status") in final:
            return dict(job)
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout:.0f} s")


def wait_for(predicate: object, timeout: float = 60.0, interval: float = 0.1) -> None:
    """Poll a zero-argument callable until it returns true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
