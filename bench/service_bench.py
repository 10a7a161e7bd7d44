"""Benchmark the service: upload throughput of a ~200 MB model, and job-status latency with 20 running jobs.

    python bench/service_bench.py [--size-mb 200] [--uploads 3] [--jobs 20] [--gets 2000] [--out FILE.json]

Both parts run against a real ``slimserve serve`` subprocess (``SLIMSERVE_RUN_WORKER=false``, a
temporary ``SLIMSERVE_HOME`` with SQLite and local artifacts):

1. Upload: a real ONNX model (one MatMul whose random float32 initializer makes it ~``--size-mb``
   MB) is uploaded ``--uploads`` times with the streaming :class:`service.client.SlimserveClient`;
   the wall time of each upload gives MB/s (1 MB = 10^6 bytes). The server's RSS (psutil) is read
   before, sampled every 10 ms during, and read after each upload: memory is "flat" when the peak
   stays within 64 MiB of the RSS before, i.e. far from the file's size (a buffered upload would
   add at least the whole file).
2. Latency: ``--jobs`` small uploads are queued, then claimed with ``JobStore.claim("bench")``
   on the same SQLite file so they really are ``running``; then ``--gets`` sequential
   ``GET /v1/jobs/{id}`` (round-robin over the jobs) on one keep-alive client, after a warm-up;
   p50/p95/p99 in ms, once with the project's client (httpx) and once with ``http.client``.

Prints a markdown section (machine, date, command, a table with targets); ``--out`` also writes
the figures as JSON. Targets are reported PASS/MISS and never make the script fail.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench.serving_procs import slimserve  # noqa: E402 - after the path fix above
from bench.serving_report import add_output_args, publish  # noqa: E402

MB = 1_000_000
MIB = 1 << 20
FLAT_MIB = 64  # allowed RSS growth during an upload for "flat" memory


def build_mlp(path: Path, size_bytes: int, in_features: int = 4096, seed: int = 0) -> Path:
    """A real ONNX model ``y = x @ W + b`` whose float32 ``W`` makes the file about ``size_bytes``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_features = max(1, -(-size_bytes // (4 * in_features)))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((in_features, out_features), dtype=np.float32)
    bias = np.zeros(out_features, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "bench_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def build_data(path: Path, in_features: int, samples: int = 8) -> Path:
    """Sample data for :func:`build_mlp`: ``x[samples, in_features]``."""
    import numpy as np

    np.savez(path, x=np.random.default_rng(1).standard_normal((samples, in_features), dtype=np.float32))
    return path


class RssSampler:
    """Samples a process's resident memory every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        """The current RSS in bytes."""
        return int(self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def bench_upload(url: str, pid: int, work: Path, size_mb: float, uploads: int) -> dict[str, Any]:
    """Upload a ~``size_mb`` MB ONNX model ``uploads`` times; MB/s and the server's RSS per run."""
    from service.client import SlimserveClient

    model = build_mlp(work / "big.onnx", int(size_mb * MB))
    data = build_data(work / "big.npz", 4096)
    size = model.stat().st_size + data.stat().st_size
    runs = []
    with SlimserveClient(url, timeout=300) as client:
        for index in range(uploads):
            sampler = RssSampler(pid)
            before = sampler.rss()
            with sampler:
                started = time.perf_counter()
                client.upload(model, data, {"name": f"big-{index}"})
                seconds = time.perf_counter() - started
            after = sampler.rss()
            runs.append({"seconds": seconds, "mb_per_s": size / MB / seconds, "rss_before": before,
                         "rss_peak": sampler.peak, "rss_after": after})  # fmt: skip
            client.delete(f"big-{index}")  # free the disk and leave no queued job for part 2
    return {"model_bytes": model.stat().st_size, "body_bytes": size, "runs": runs}


def bench_status(url: str, home: Path, work: Path, jobs: int, gets: int, warmup: int = 100) -> dict[str, Any]:
    """Queue ``jobs`` small uploads, claim them all (running), then time ``gets`` sequential GETs per client.

    Two keep-alive clients: :class:`SlimserveClient` (httpx, what users run: end-to-end figures)
    and the standard library's ``http.client`` (far less client overhead: closer to the server's share).
    """
    from service.client import SlimserveClient
    from service.jobs.store import JobStore
    from service.storage.db import create_db_engine

    model = build_mlp(work / "small.onnx", 16 * 4 * 4, in_features=16)
    data = build_data(work / "small.npz", 16)
    with SlimserveClient(url) as client:
        ids = [client.upload(model, data, {"name": f"small-{i}"})["job"]["id"] for i in range(jobs)]
        engine = create_db_engine(f"sqlite:///{(home / 'slimserve.db').resolve()}")
        try:
            store = JobStore(engine, lease_seconds=24 * 3600)
            claimed = [store.claim("bench") for _ in range(jobs)]
        finally:
            engine.dispose()
        if any(claim is None for claim in claimed):
            raise RuntimeError("could not claim every job")
        running = sum(client.job(job_id)["status"] == "running" for job_id in ids)
        if running != jobs:
            raise RuntimeError(f"only {running} of {jobs} jobs are running")
        httpx_ms = _time_gets(lambda job_id: client.job(job_id), ids, gets, warmup)
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
    try:

        def stdlib_get(job_id: str) -> None:
            connection.request("GET", f"/v1/jobs/{job_id}")
            response = connection.getresponse()
            if response.status != 200 or json.loads(response.read())["status"] != "running":
                raise RuntimeError(f"GET /v1/jobs/{job_id} answered {response.status}")

        stdlib_ms = _time_gets(stdlib_get, ids, gets, warmup)
    finally:
        connection.close()
    return {"jobs_running": running, "gets": gets, "slimserve_client": httpx_ms, "http_client": stdlib_ms}


def _time_gets(get: Callable[[str], object], ids: list[str], gets: int, warmup: int) -> dict[str, float]:
    """Percentiles (ms) of ``gets`` sequential calls of ``get``, round-robin over ``ids``, after a warm-up."""
    for i in range(warmup):
        get(ids[i % len(ids)])
    samples = []
    for i in range(gets):
        started = time.perf_counter_ns()
        get(ids[i % len(ids)])
        samples.append((time.perf_counter_ns() - started) / 1e6)
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": cuts[49], "p95_ms": cuts[94], "p99_ms": cuts[98], "max_ms": max(samples),
            "mean_ms": statistics.fmean(samples)}  # fmt: skip


def markdown(machine: dict[str, Any], upload: dict[str, Any], status: dict[str, Any], args: argparse.Namespace) -> str:
    """The section for bench/RESULTS.md."""
    runs = upload["runs"]
    speeds = [run["mb_per_s"] for run in runs]
    median = statistics.median(speeds)
    growth = max(run["rss_peak"] - run["rss_before"] for run in runs)
    before, peak, after = runs[0]["rss_before"], max(r["rss_peak"] for r in runs), runs[-1]["rss_after"]
    mem = f"{before / MIB:.0f} / {peak / MIB:.0f} / {after / MIB:.0f} MiB (max growth {growth / MIB:.1f} MiB)"
    size = upload["model_bytes"] / MB

    def status_of(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    lines = [
        f"## Service benchmark, {machine['date']}",
        "",
        f"- machine: {machine['cpu']}, {machine['physical_cores']} physical / {machine['logical_cores']} logical "
        f"cores, {machine['memory_gib']} GiB, {machine['os']}",
        f"- python {machine['python']}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        f"- command: `{machine['command']}`; 1-minute load average before/after: "
        f"{machine['load_before']:.1f} / {machine['load_after']:.1f} (other work on the machine skews the figures)",
        "- server: `slimserve serve` subprocess, SQLite + local artifacts in a temp SLIMSERVE_HOME, worker off; "
        "client: `service.client.SlimserveClient` (httpx, keep-alive) in the benchmark process",
        "",
        "| measure | result | target | status |",
        "|---|---:|---|---|",
        f"| upload of a {size:.0f} MB ONNX model, median of {len(runs)} | {median:.0f} MB/s "
        f"(runs: {', '.join(f'{s:.0f}' for s in speeds)}) | >= 200 MB/s | {status_of(median >= 200)} |",
        f"| server RSS before / peak during / after the uploads | {mem} | flat (growth < {FLAT_MIB} MiB) "
        f"| {status_of(growth < FLAT_MIB * MIB)} |",
        *(
            f"| `GET /v1/jobs/{{id}}`, {status['jobs_running']} jobs running, {status['gets']} sequential GETs, "
            f"{label} | p50 {t['p50_ms']:.2f} / p95 {t['p95_ms']:.2f} / p99 {t['p99_ms']:.2f} ms "
            f"(max {t['max_ms']:.1f}) | p99 < 10 ms | {status_of(t['p99_ms'] < 10)} |"
            for label, t in (
                ("SlimserveClient (httpx)", status["slimserve_client"]),
                ("stdlib http.client", status["http_client"]),
            )
        ),
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description="Benchmark slimserve's upload throughput and job-status latency.")
    parser.add_argument("--size-mb", type=float, default=200.0, help="model file size in MB (10^6 bytes)")
    parser.add_argument("--uploads", type=int, default=3, help="timed uploads of the big model")
    parser.add_argument("--jobs", type=int, default=20, help="running jobs during the latency test")
    parser.add_argument("--gets", type=int, default=2000, help="sequential GET /v1/jobs/{id} to time")
    add_output_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run both benchmarks; print the markdown section; 0 unless the service could not be benchmarked."""
    from bench.optimizer_bench import machine_info

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    machine = machine_info(["bench/service_bench.py", *argv])
    machine["load_before"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="slimserve-bench-") as temp:
        work, home = Path(temp) / "work", Path(temp) / "home"
        work.mkdir()
        home.mkdir()
        with slimserve(home, cpus=None, settings={"SLIMSERVE_RUN_WORKER": "false"}) as served:
            url, pid = served.url, served.popen.pid
            upload = bench_upload(url, pid, work, args.size_mb, args.uploads)
            status = bench_status(url, home, work, args.jobs, args.gets)
    machine["load_after"] = os.getloadavg()[0]
    publish(markdown(machine, upload, status, args), {"machine": machine, "upload": upload, "status": status},
            args.markdown, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
