"""Server processes for the serving benchmark: slimserve and LitServe, optionally pinned to CPUs, with CPU accounting.

Pinning uses ``taskset`` on the command line (util-linux), so every thread and child process of a
server inherits it from its first instruction; the benchmark process pins itself with
``os.sched_setaffinity``. Each server runs in its own session (process group) so that stopping it
also stops the processes it spawned (LitServe's inference worker and queue manager).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(command: Sequence[str], cpus: set[int] | None) -> list[str]:
    """``command`` under ``taskset -c CPUS`` (unchanged when ``cpus`` is None)."""
    if not cpus:
        return list(command)
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("taskset (util-linux) is needed to pin the servers; run with --no-pin")
    return [taskset, "-c", ",".join(str(cpu) for cpu in sorted(cpus)), *command]


@dataclass
class Server:
    """A running server process group: its URL, its log and CPU accounting over its process tree."""

    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server and its live children so far."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.popen.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
        except psutil.Error:
            pass
        return total

    def output(self) -> str:
        """The tail of the server's log."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (LitServe's children)
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def _launch(command: list[str], log: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_http(server: Server, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.popen.returncode}:\n{server.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name}: {path} did not answer 200 within {timeout_s:.0f} s:\n{server.output()}")


@contextlib.contextmanager
def slimserve(home: Path, *, cpus: set[int] | None, settings: Mapping[str, str]) -> Iterator[Server]:
    """``slimserve serve`` (worker on, SQLite and artifacts under ``home``) until ``/v2/health/ready`` answers 200.

    ``settings`` are ``SLIMSERVE_*`` variables; the benchmark's own ``SLIMSERVE_*`` environment is not passed on.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    env.update(SLIMSERVE_HOME=str(home), SLIMSERVE_LOG_LEVEL="warning", SLIMSERVE_DRAIN_SECONDS="0")
    env.update(settings)
    command = pinned([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)], cpus)
    log = home / "server.log"
    server = Server("slimserve", f"http://127.0.0.1:{port}", _launch(command, log, env, ROOT), log)
    try:
        _wait_http(server, "/v2/health/ready", 120)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def litserve(
    model: Path,
    work: Path,
    *,
    cpus: set[int] | None,
    threads: int,
    python: str,
    max_batch_size: int,
    batch_timeout: float,
) -> Iterator[Server]:
    """``bench/litserve_app.py`` on ``model`` until its ``/health`` answers 200."""
    port = free_port()
    app = ROOT / "bench" / "litserve_app.py"
    command = [
        python,
        str(app),
        str(model),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-batch-size",
        str(max_batch_size),
        "--batch-timeout",
        str(batch_timeout),
    ]
    log = work / "litserve.log"
    server = Server("litserve", f"http://127.0.0.1:{port}", _launch(pinned(command, cpus), log, os.environ, work), log)
    try:
        _wait_http(server, "/health", 180)
        yield server
    finally:
        server.stop()


def upload(url: str, model: Path, data: Path, config: dict[str, Any], timeout_s: float = 900.0) -> dict[str, Any]:
    """Upload with :class:`service.client.SlimserveClient` and wait for the optimization job; the final job."""
    from service.client import SlimserveClient

    with SlimserveClient(url, timeout=300) as client:
        job_id = client.upload(model, data, config)["job"]["id"]
        job = client.wait(job_id, timeout=timeout_s, poll=0.5)
    if job.get("status") != "succeeded":
        raise RuntimeError(f"optimization of {config['name']} ended {job.get('status')}: {job.get('error')}")
    return dict(job)


def download_version(url: str, name: str, version: int, dest: Path) -> Path:
    """The ``model.onnx`` a version serves."""
    from service.client import SlimserveClient

    with SlimserveClient(url, timeout=300) as client:
        return client.download(name, version, "model.onnx", dest)


def wait_ready(url: str, path: str, timeout_s: float = 300.0) -> None:
    """Poll ``GET path`` until 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not ready after {timeout_s:.0f} s")
        time.sleep(0.25)


#: The batcher's histograms on ``/metrics`` (``slimserve_inference_<name>``).
HISTOGRAMS = ("request_duration_seconds", "queue_duration_seconds", "compute_duration_seconds", "batch_size")


def scrape(url: str, model: str, version: int) -> dict[str, float]:
    """``_sum`` and ``_count`` of the batcher's histograms for one model version, from ``GET /metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    wanted = {f"slimserve_inference_{name}" for name in HISTOGRAMS}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                labels.get("model") == model
                and labels.get("version") == str(version)
                and sample.name.endswith(("_sum", "_count"))
            ):
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Means over the requests/batches between two :func:`scrape` calls: ms in server, queue, compute; batch rows."""
    means: dict[str, float] = {}
    for name in HISTOGRAMS:
        key = f"slimserve_inference_{name}"
        count = after.get(f"{key}_count", 0.0) - before.get(f"{key}_count", 0.0)
        total = after.get(f"{key}_sum", 0.0) - before.get(f"{key}_sum", 0.0)
        if count > 0:
            short = name.removesuffix("_seconds")
            means[f"{short}_ms" if name.endswith("_seconds") else short] = (
                total / count * (1e3 if name.endswith("_seconds") else 1.0)
            )
    return means
