"""Load, soak and burst: slimserve under sustained mixed traffic, and when its queue overflows.

    python bench/soak_bench.py [--duration 600] [--fraction 0.7] [--upload-every 60] [--out FILE.json]

One real ``slimserve serve`` (SQLite, local artifacts, its in-process worker), pinned like the
serving benchmark (server on every CPU but the first, this process on the first; ONNX Runtime
with one thread per server CPU). It serves the MLP 64->256->256->10 of ``bench/serving_bench.py``
with JSON requests of one sample.

1. Peak: ``--concurrency`` closed loops for ``--peak-seconds``, requests per second: once with
   inference alone, then with uploads and their optimization jobs running back to back beside it.
   The second is the peak of the soak's mix (a job shares the server's CPUs) and sets its rate.
2. Soak: an open loop at ``--fraction`` of that peak for ``--duration`` seconds (constant rate,
   latency from the scheduled send time, so a stall is counted, not hidden), while a thread uploads
   a model every ``--upload-every`` seconds, follows its optimization job to the end and deletes
   it again: uploads and inference together. Every ``--sample-every`` seconds the server's
   resident memory and open file descriptors are recorded (its process only: a job's optimization
   runs in a child process that exits; sockets counted apart, they follow the client's
   connections). Targets: zero failed requests, uploads and jobs; RSS growth under 5% from the end
   of the first minute (warm-up: caches, arenas, connections) to the end of the run; the fewest
   other descriptors in the last minute no more than in the first minute after warm-up (a job's
   files and the SQLite journal come and go; a leak raises the floor).
3. Burst: ``--burst-factor`` times the peak for ``--burst-seconds`` against a server whose
   queue holds ``--burst-queue`` requests per version, serving a wide MLP 64->4096->4096->10 whose
   compute (not HTTP parsing) is the bottleneck. Target: the overflow is refused with 503 and
   nothing times out or goes unanswered; accepted requests are answered. How fast the refusals
   come is reported (on one core they wait behind the compute, see bench/notes/soak.md).

Prints a markdown section; ``--out`` writes every figure as JSON. Targets never fail the script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench import kserve, loadgen  # noqa: E402
from bench import serving_procs as procs  # noqa: E402
from bench.serving_bench import JOB, build_mlp, check, pin_self, session_for  # noqa: E402
from bench.serving_latency import heavy_server  # noqa: E402
from bench.serving_report import add_output_args, machine, ms, publish, status  # noqa: E402
from bench.soak_plot import IMAGE, PICTURE, draw  # noqa: E402
from service.client import SlimserveClient  # noqa: E402

RSS_GROWTH_LIMIT = 0.05


class Sampler(threading.Thread):
    """Resident memory and open descriptors (files apart from sockets) of one process, every
    ``every`` seconds, until stopped. Sockets follow the load generator's connection count; files,
    pipes and the like would show a leak."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        # (seconds since start, RSS bytes, descriptors other than sockets, sockets: client connections)
        self.samples: list[tuple[float, int, int, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        import psutil

        process, start = psutil.Process(self.pid), time.monotonic()
        while not self.halt.is_set():
            try:
                rss = process.memory_info().rss
                fds = os.listdir(f"/proc/{self.pid}/fd")
            except (psutil.Error, OSError):  # the process is gone
                return
            links = []
            for fd in fds:  # a descriptor closed since the listing is simply not counted
                with contextlib.suppress(FileNotFoundError):
                    links.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            sockets = sum(link.startswith("socket:") for link in links)
            self.samples.append((time.monotonic() - start, rss, len(links) - sockets, sockets))
            self.halt.wait(self.every)

    def at(self, seconds: float) -> tuple[float, int, int, int]:
        """The first sample taken at or after ``seconds`` (the last one if none)."""
        return next((s for s in self.samples if s[0] >= seconds), self.samples[-1])


class Uploader(threading.Thread):
    """Uploads a model every ``every`` seconds, follows each job to its end and deletes the model
    (a served model's session is memory the server rightly holds, not a leak), until stopped."""

    def __init__(self, url: str, model: Path, data: Path, every: float, prefix: str = "soak") -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.data, self.every, self.prefix = url, model, data, every, prefix
        self.outcomes: dict[str, int] = {}
        self.job_seconds: list[float] = []
        self.first_error: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        count = 0
        while not self.halt.wait(0 if count == 0 else self.every):
            count += 1
            started, name = time.monotonic(), f"{self.prefix}-{count}"
            try:
                job = procs.upload(self.url, self.model, self.data, {"name": name, **JOB}, timeout_s=300)
                outcome = str(job.get("status"))
                with SlimserveClient(self.url, timeout=60) as client:  # else every upload adds a served model
                    client.delete(name)
            except Exception as exc:  # recorded, not hidden: every outcome is counted and the first kept
                outcome = "failed" if isinstance(exc, RuntimeError) else type(exc).__name__
                self.first_error = self.first_error or str(exc)[:300]
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self.job_seconds.append(time.monotonic() - started)


def soak(args: argparse.Namespace, work: Path, settings: dict[str, str]) -> dict[str, Any]:
    """Parts 1 and 2 on one server."""
    mlp = build_mlp(work / "mlp.onnx", (64, 256, 256, 10))
    data = work / "mlp.npz"
    rng = np.random.default_rng(3)
    np.savez(data, x=rng.standard_normal((64, 64), dtype=np.float32))
    x = rng.standard_normal((1, 64), dtype=np.float32)
    request = kserve.json_request("/v2/models/mlp/versions/1/infer", {"x": x})
    expected = {"logits": session_for(mlp).run(None, {"x": x})[0]}
    with procs.slimserve(work / "home-soak", cpus=args.server_cpus, settings=settings) as server:
        procs.upload(server.url, mlp, data, {"name": "mlp", **JOB})
        procs.wait_ready(server.url, "/v2/models/mlp/versions/1/ready")
        pin_self(args.client_cpus)
        check(server.url, request, expected)
        alone = loadgen.closed_loop(
            server.url, request, concurrency=args.concurrency, warmup_s=3, duration_s=args.peak_seconds
        )
        # The peak of the soak's own mix: inference while uploads and their jobs run back to back
        # (more job work than the soak's one a minute). A job shares the server's CPUs, so 70% of
        # the inference-only peak is more than the server can sustain beside one.
        busy = Uploader(server.url, mlp, data, every=0.0, prefix="peak")
        busy.start()
        try:
            time.sleep(1.0)
            peak = loadgen.closed_loop(
                server.url, request, concurrency=args.concurrency, warmup_s=3, duration_s=args.peak_seconds
            )
        finally:
            busy.halt.set()
            busy.join(timeout=330)
        rate = args.fraction * peak.requests_per_s
        sampler = Sampler(server.popen.pid, args.sample_every)
        uploader = Uploader(server.url, mlp, data, args.upload_every)
        sampler.start()
        uploader.start()
        try:
            load = loadgen.open_loop(
                server.url, request, rate=rate, warmup_s=0, duration_s=args.duration, server_cpu=server.cpu_seconds
            )
        finally:
            uploader.halt.set()
            uploader.join(timeout=330)
            sampler.halt.set()
            sampler.join()
        pin_self(None)
    warm = min(60.0, args.duration / 4)
    (_, rss0, _, _), (_, rss1, _, _) = sampler.at(warm), sampler.samples[-1]
    late = [sample for sample in sampler.samples if sample[0] >= warm] or sampler.samples[-1:]
    fds0, fds1 = descriptor_floor(sampler.samples, warm, warm), descriptor_floor(sampler.samples, warm, None)
    return {
        "peak_alone": alone.as_dict(),
        "peak": peak.as_dict(),
        "peak_uploads": busy.outcomes,
        "rate": rate,
        "load": load.as_dict(),
        "uploads": uploader.outcomes,
        "upload_first_error": uploader.first_error,
        "upload_job_ms": loadgen.percentiles([s * 1e3 for s in uploader.job_seconds]),
        "memory": {
            "from_s": warm,
            "rss_start": rss0,
            "rss_end": rss1,
            "rss_growth": rss1 / rss0 - 1,
            "fds_start": fds0,
            "fds_end": fds1,
            "fds_max_after_warmup": max(sample[2] for sample in late),
            "sockets_min_max_after_warmup": [min(sample[3] for sample in late), max(sample[3] for sample in late)],
            # the memory and descriptor checks hold only if the samples reach the end of the soak
            "sampled_until_s": sampler.samples[-1][0],
            "covers_the_soak": sampler.samples[-1][0] >= args.duration - 2 * args.sample_every,
        },
        "samples": sampler.samples,
    }


def descriptor_floor(samples: Sequence[tuple[float, int, int, int]], window: float, start: float | None) -> int:
    """The fewest non-socket descriptors over ``window`` seconds of samples: from ``start``, or the
    last ``window`` seconds when ``start`` is None. A job's files and the SQLite journal come and go;
    a leak raises the floor."""
    if start is None:
        start = samples[-1][0] - window
    inside = [sample[2] for sample in samples if start <= sample[0] <= start + window]
    return min(inside) if inside else samples[-1][2]


def burst(args: argparse.Namespace, work: Path, settings: dict[str, str]) -> dict[str, Any]:
    """Part 3 on a fresh server with a small queue, serving a model whose compute is the bottleneck.

    With the tiny MLP, HTTP parsing on the server's core saturates first: requests then wait in
    the socket's backlog before the server has read them, so no server could answer them "at
    once". A wide MLP makes the batcher's queue the thing that overflows, which is what the
    queue bound is for.
    """
    settings = {**settings, "SLIMSERVE_MAX_QUEUE_SIZE": str(args.burst_queue)}
    with heavy_server(work, "home-burst", args.server_cpus, settings) as heavy:
        server, request = heavy.server, heavy.request
        pin_self(args.client_cpus)
        peak = loadgen.closed_loop(server.url, request, concurrency=args.concurrency, warmup_s=2, duration_s=5)
        rate = args.burst_factor * peak.requests_per_s
        result = loadgen.open_loop(
            server.url, request, rate=rate, warmup_s=0, duration_s=args.burst_seconds, drain_s=60, max_connections=2048
        )
        pin_self(None)
        alive = httpx.get(server.url + "/v2/health/live", timeout=5).status_code
    return {"peak": peak.requests_per_s, "rate": rate, "queue": args.burst_queue, "load": result.as_dict(),
            "live_after": alive}  # fmt: skip


def markdown(info: dict[str, Any], results: dict[str, Any]) -> str:
    """The section for bench/RESULTS.md."""
    soaked, burst_run = results["soak"], results.get("burst")
    load, memory = soaked["load"], soaked["memory"]
    failed_uploads = sum(n for state, n in soaked["uploads"].items() if state != "succeeded")
    whole = bool(memory["covers_the_soak"])
    covered = "the end" if whole else f"{memory['sampled_until_s']:.0f} s (sampling stopped early)"
    lines = [
        f"## Load, soak and burst, {info['date']}",
        "",
        f"- machine: {info['cpu']}, {info['logical_cores']} logical cores, {info['memory_gib']} GiB; "
        f"python {info['python']}; slimserve {info['versions'].get('slimserve')}",
        f"- command: `{info['command']}`; server on CPUs {info['server_cpus'] or 'all'}, load generator on "
        f"{info['client_cpus'] or 'all'}",
        "",
        "| measure | result | target | status |",
        "|---|---|---|---|",
        f"| peak (closed loops, c={results['args']['concurrency']}), inference alone | "
        f"{soaked['peak_alone']['requests_per_s']:.0f} req/s | - | - |",
        f"| peak, with uploads and their jobs back to back ({soaked['peak_uploads']}) | "
        f"{soaked['peak']['requests_per_s']:.0f} req/s | - | - |",
        f"| soak: {load['window_s']:.0f} s at {soaked['rate']:.0f} req/s "
        f"({results['args']['fraction']:.0%} of peak) | {load['requests']} answered, errors {load['errors'] or 0}, "
        f"p50 / p99 / max {ms(load['latency_ms'].get('p50'))} / {ms(load['latency_ms'].get('p99'))} / "
        f"{ms(load['latency_ms'].get('max'))} ms | zero errors | {status(not load['errors'])} |",
        f"| soak: uploads and jobs alongside | {soaked['uploads']} | all succeeded | {status(failed_uploads == 0)} |",
        f"| soak: server RSS from {memory['from_s']:.0f} s to {covered} | {memory['rss_start'] / 2**20:.1f} -> "
        f"{memory['rss_end'] / 2**20:.1f} MiB ({memory['rss_growth']:+.1%}) | < +5% | "
        f"{status(whole and memory['rss_growth'] < RSS_GROWTH_LIMIT)} |",
        f"| soak: open descriptors other than sockets, fewest in the first and in the last minute | "
        f"{memory['fds_start']} -> {memory['fds_end']} (max {memory['fds_max_after_warmup']}; sockets "
        f"{memory['sockets_min_max_after_warmup']}) | no growth | "
        f"{status(whole and memory['fds_end'] <= memory['fds_start'])} |",
    ]
    if burst_run:
        blast = burst_run["load"]
        refused = blast["by_status_ms"].get("503", {})
        lost = {k: v for k, v in blast["errors"].items() if k != "503"}
        lines += [
            f"| burst: MLP 64-4096-4096-10 (peak {burst_run['peak']:.0f} req/s), {blast['window_s']:.0f} s at "
            f"{burst_run['rate']:.0f} req/s, queue {burst_run['queue']} | "
            f"{blast['requests']} answered 200, refusals {blast['errors'].get('503', 0)} ("
            f"{ms(refused.get('p50'))} / {ms(refused.get('p99'))} ms p50 / p99), other failures {lost or 0} | "
            f"503s, no timeouts or lost requests | {status(bool(refused) and not lost)} |",
        ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description="Soak and burst slimserve with inference and uploads together.")
    parser.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    parser.add_argument("--fraction", type=float, default=0.7, help="soak rate as a fraction of the peak")
    parser.add_argument("--concurrency", type=int, default=64, help="closed loops for the peak")
    parser.add_argument("--peak-seconds", type=float, default=10.0)
    parser.add_argument("--upload-every", type=float, default=60.0, help="seconds between uploads during the soak")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS / descriptor samples")
    parser.add_argument("--burst-factor", type=float, default=2.0, help="burst rate as a multiple of the peak")
    parser.add_argument("--burst-seconds", type=float, default=5.0)
    parser.add_argument("--burst-queue", type=int, default=256, help="the burst server's max_queue_size")
    parser.add_argument("--no-burst", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    add_output_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Soak, then burst; print the markdown section."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    args.server_cpus = args.client_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        args.client_cpus, args.server_cpus = {cpus[0]}, set(cpus[1:])
    settings = {"SLIMSERVE_INFERENCE_THREADS": str(len(args.server_cpus))} if args.server_cpus else {}
    info = machine(argv, args)
    info["command"] = "python bench/soak_bench.py " + " ".join(argv)
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if isinstance(v, int | float | str)}}
    with tempfile.TemporaryDirectory(prefix="slimserve-soak-") as temp:
        work = Path(temp)
        results["soak"] = soak(args, work, settings)
        if not args.no_burst:
            results["burst"] = burst(args, work, settings)
    section = markdown(info, results)
    if args.markdown:  # the picture next to the section; RESULTS.md shows it below the table
        draw(results, PICTURE)
        section += f"\n{IMAGE}\n"
    publish(section, {"machine": info, "results": results}, args.markdown, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
