"""Part 4 of the serving benchmark: p99 latency at half the measured peak, against the batcher's bound.

The bound is ``max_queue_delay`` plus twice the compute time of a full batch: a request may wait
for batch-mates up to the delay, then for the batch already running, then for its own. It is the
latency a batcher adds when the model's compute is what the server spends its time on. It is
measured three times:

- on the tiny MLP of part 2 (0.1 ms per batch of 32), where the bound (about 2.2 ms) is smaller
  than parsing and answering the request in Python (about 0.4 ms of CPU per request on one core,
  see bench/notes/serving.md): no HTTP server in Python can meet it there;
- on a memory-bound MLP 64->4096->4096->10 (the burst model of ``bench/soak_bench.py``): 64 MB of
  weights stream through the core for every batch, so a batch of 6 costs half a batch of 32 and at
  half the peak request rate the core is already fully busy (see bench/notes/serving.md);
- on the BERT encoder of part 1 with one-sample requests, whose compute grows with the batch (50 ms
  per sample on one core): the case the bound was written for, where half the peak rate leaves half
  the core idle.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import kserve, loadgen
from bench import serving_procs as procs


def at_half_peak(
    args: argparse.Namespace,
    server: procs.Server,
    model: str,
    session: Any,
    request: kserve.HttpRequest,
    peak: float,
    row: dict[str, np.ndarray],
    settings: dict[str, str],
    *,
    warmup_s: float | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """The open loop at half of ``peak`` against ``server``'s ``model``, with the bound's parts.

    ``session`` is the model in this process with the server's thread count; it times a full batch
    (``row``, one sample, repeated) on the server's CPUs (server idle) for the bound. The open loop
    runs ``args.warmup`` / ``args.duration`` unless ``warmup_s`` / ``duration_s`` say otherwise.
    """
    from bench.serving_bench import inprocess, knob, measured, pin_self

    max_batch = int(knob(settings, "max_batch_size"))
    pin_self(args.server_cpus)
    compute = inprocess(session, {name: np.repeat(value, max_batch, axis=0) for name, value in row.items()}, 3.0)
    pin_self(args.client_cpus)
    delay_ms = int(knob(settings, "max_queue_delay_microseconds")) / 1000
    opened = measured(
        server,
        model,
        lambda: loadgen.open_loop(
            server.url,
            request,
            rate=peak / 2,
            warmup_s=args.warmup if warmup_s is None else warmup_s,
            duration_s=args.duration if duration_s is None else duration_s,
            server_cpu=server.cpu_seconds,
        ),
    )
    return {
        "model": model,
        "peak_requests_per_s": peak,
        "max_batch_size": max_batch,
        "compute": compute,
        "max_queue_delay_ms": delay_ms,
        "bound_ms": delay_ms + 2 * compute["batch_ms_median"],
        "open_loop": opened,
    }


@dataclasses.dataclass(frozen=True)
class Heavy:
    """A server with the compute-bound MLP uploaded, the model file, one row and its JSON infer request."""

    server: procs.Server
    model: Path
    x: np.ndarray
    request: kserve.HttpRequest


@contextlib.contextmanager
def heavy_server(work: Path, home: str, cpus: set[int] | None, settings: dict[str, str]) -> Iterator[Heavy]:
    """A server with the compute-bound MLP 64->4096->4096->10 uploaded as ``heavy`` and ready.

    Part 4 and the soak's burst use it: 22 ms per batch of 32 on one core, so the batch compute is
    what the server spends its time on.
    """
    from bench.serving_bench import JOB, build_mlp

    heavy = build_mlp(work / "heavy.onnx", (64, 4096, 4096, 10), seed=2)
    data = work / "heavy.npz"
    np.savez(data, x=np.random.default_rng(5).standard_normal((64, 64), dtype=np.float32))
    x = np.random.default_rng(4).standard_normal((1, 64), dtype=np.float32)
    request = kserve.json_request("/v2/models/heavy/versions/1/infer", {"x": x})
    with procs.slimserve(work / home, cpus=cpus, settings=settings) as server:
        procs.upload(server.url, heavy, data, {"name": "heavy", **JOB})
        procs.wait_ready(server.url, "/v2/models/heavy/versions/1/ready")
        yield Heavy(server, heavy, x, request)


def peak_then_half(
    args: argparse.Namespace,
    server: procs.Server,
    model: str,
    session: Any,
    request: kserve.HttpRequest,
    row: dict[str, np.ndarray],
    settings: dict[str, str],
    timing: tuple[float, float, float],
) -> dict[str, Any]:
    """The closed-loop peak at ``--concurrency``, then :func:`at_half_peak`; ``timing`` is the warm-up,
    the closed loop's and the open loop's measured seconds."""
    from bench.serving_bench import measured

    warmup_s, closed_s, open_s = timing
    closed = functools.partial(
        loadgen.closed_loop,
        server.url,
        request,
        concurrency=args.concurrency,
        warmup_s=warmup_s,
        duration_s=closed_s,
        server_cpu=server.cpu_seconds,
    )
    peak = measured(server, model, closed)
    rate = peak["requests_per_s"]
    result = at_half_peak(
        args, server, model, session, request, rate, row, settings, warmup_s=warmup_s, duration_s=open_s
    )
    result["closed_loop"] = peak
    return result


def part_compute_bound(args: argparse.Namespace, work: Path, settings: dict[str, str]) -> dict[str, Any]:
    """Part 4 on the memory-bound MLP: its closed-loop peak, then the open loop at half of it."""
    from bench.serving_bench import check, pin_self, session_for

    threads = len(args.server_cpus) if args.server_cpus else 0
    if threads:
        settings = {"SLIMSERVE_INFERENCE_THREADS": str(threads), **settings}
    with heavy_server(work, "home-heavy", args.server_cpus, settings) as heavy:
        server, request = heavy.server, heavy.request
        session = session_for(heavy.model, threads)
        pin_self(args.client_cpus)
        check(server.url, request, {"logits": session.run(None, {"x": heavy.x})[0]})
        timing = (args.warmup, args.duration, args.duration)
        result = peak_then_half(args, server, "heavy", session, request, {"x": heavy.x}, settings, timing)
        pin_self(None)
    return result


def part_bert(args: argparse.Namespace, work: Path, settings: dict[str, str]) -> dict[str, Any]:
    """Part 4 on the BERT encoder of part 1, one-sample binary requests, on the pinned server CPUs.

    Its closed-loop peak at ``--concurrency`` (full batches of 32), then the open loop at half of it
    for ``--bert-latency-duration`` seconds (about 10 requests/s on one core, so a few hundred
    requests decide the p99).
    """
    from bench.models import BERT_OUTPUT, bert_inputs, bert_sample
    from bench.serving_bench import JOB, check, export_bert, pin_self, session_for

    threads = len(args.server_cpus) if args.server_cpus else 0
    if threads:
        settings = {"SLIMSERVE_INFERENCE_THREADS": str(threads), **settings}
    pin_self(None)
    model = export_bert(work / "bert-latency.onnx", args.bert_layers, args.seq_len)
    sample = bert_sample(work / "bert-latency.npz", n=32, seq_len=args.seq_len)
    row = bert_inputs(1, args.seq_len, seed=11)
    request = kserve.binary_request("/v2/models/bert/versions/1/infer", row)
    with procs.slimserve(work / "home-bert-latency", cpus=args.server_cpus, settings=settings) as server:
        procs.upload(server.url, model, sample, {"name": "bert", **JOB})
        procs.wait_ready(server.url, "/v2/models/bert/versions/1/ready")
        session = session_for(procs.download_version(server.url, "bert", 1, work / "bert-latency-v1.onnx"), threads)
        pin_self(args.client_cpus)
        check(server.url, request, {BERT_OUTPUT: session.run(None, row)[0]})
        timing = (args.bert_warmup, args.bert_duration, args.bert_latency_duration)
        result = peak_then_half(args, server, "bert", session, request, row, settings, timing)
        pin_self(None)
    return result
