"""Benchmark KServe v2 serving side by side: slimserve vs in-process ONNX Runtime and vs LitServe.

    python bench/serving_bench.py [--duration 15] [--warmup 3] [--concurrency 64] [--out FILE.json]

Four measurements in one run (each server is a real subprocess; see ``bench/serving_procs.py``):

1. Efficiency: the BERT-class encoder of ``bench/models.py`` (6 layers, hidden 384, seq 128) is
   uploaded to slimserve and its version 1 (the original) served; ``--concurrency`` closed loops
   send batch-32 requests with binary tensors (what ``tritonclient`` sends by default; its output
   is 6 MB as binary, ~30 MB as JSON). Served samples/s vs the same model in this process with
   :func:`optimizer.runtime.create_session` at batch 32 (measured before and after; mean). Nothing
   is pinned here: server and baseline both get every core, the load generator is nearly idle.
2. Overhead: a tiny MLP 64->256->256->10, JSON requests of one sample, ``--concurrency`` closed
   loops: slimserve vs LitServe (``bench/litserve_app.py``: ``max_batch_size=32``,
   ``batch_timeout=0.002``, one worker). Same load generator, same JSON body.
3. Binary vs JSON: an MLP with 16384 float inputs (a 64 KB tensor), slimserve only.
4. Latency: an open-loop constant rate at half of slimserve's peak from 2 (latency from the
   scheduled send time); p99 vs ``max_queue_delay`` + 2x the in-process compute time of a full batch.
   Parts ``latency-compute`` and ``latency-bert`` do the same on a memory-bound MLP and on the BERT
   encoder of part 1 with one-sample requests (``bench/serving_latency.py`` says why three models).

Helpers: ``bench/serving_procs.py`` (server processes, CPU pinning, ``/metrics`` means),
``bench/loadgen.py`` (the load generator), ``bench/httpclient.py`` (its HTTP client),
``bench/kserve.py`` (request bodies), ``bench/serving_report.py`` (the markdown).

For 2-4 the load generator (this process) is pinned to one CPU and the servers to the others
(``--client-cpus`` / ``--server-cpus``), and every ONNX Runtime session there uses as many threads
as the servers have CPUs. Prints a markdown section (machine, versions, command, targets with
PASS/MISS); ``--out`` also writes every figure as JSON. Targets never make the script fail.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import httpclient, kserve, loadgen  # noqa: E402
from bench import serving_procs as procs  # noqa: E402
from bench.serving_latency import at_half_peak, part_bert, part_compute_bound  # noqa: E402
from bench.serving_report import add_output_args, machine, markdown, publish  # noqa: E402

PARTS = ("efficiency", "overhead", "binary", "latency", "latency-compute", "latency-bert")
#: The optimization job every upload runs: the cheapest recipe; version 1 (the original) is what we serve.
JOB = {"techniques": ["graph"], "latency_seconds": 0.2, "fallback": False, "measure_memory": False, "deploy": False}


def build_mlp(path: Path, sizes: Sequence[int], seed: int = 0) -> Path:
    """``x[batch, sizes[0]]`` -> (MatMul, Add, Relu)* -> MatMul, Add -> ``logits[batch, sizes[-1]]``, random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "x"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        weights += [
            numpy_helper.from_array(weight, f"w{layer}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{layer}"),
        ]
        last = layer == len(sizes) - 2
        nodes += [
            helper.make_node("MatMul", [current, f"w{layer}"], [f"m{layer}"]),
            helper.make_node("Add", [f"m{layer}", f"b{layer}"], ["logits" if last else f"a{layer}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{layer}"], [f"r{layer}"]))
            current = f"r{layer}"
    graph = helper.make_graph(
        nodes,
        "bench_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_bert(path: Path, layers: int, seq_len: int) -> Path:
    """Export the BERT encoder in a child process: torch never runs in the process that times in-process ORT."""
    code = (
        "import sys; from pathlib import Path; from bench.models import bert_encoder_onnx; "
        "bert_encoder_onnx(Path(sys.argv[1]), layers=int(sys.argv[2]), seq_len=int(sys.argv[3]))"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(layers), str(seq_len)], cwd=ROOT, check=True)
    return path


def measured(server: procs.Server, model: str, run: Callable[[], loadgen.LoadResult]) -> dict[str, Any]:
    """``run()``'s figures plus the server's own means over it (from its ``/metrics`` histograms)."""
    before = procs.scrape(server.url, model, 1)
    result = run().as_dict()
    result["server_means"] = procs.server_means(before, procs.scrape(server.url, model, 1))
    return result


def session_for(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime session from the shared factory (CPU; ``threads`` intra-op threads, 0 = its default)."""
    from optimizer.runtime import RuntimeOptions, create_session

    return create_session(path, RuntimeOptions(device="cpu", intra_op_threads=threads))


def inprocess(session: Any, feeds: Mapping[str, np.ndarray], seconds: float, warmup_runs: int = 2) -> dict[str, float]:
    """Back-to-back ``session.run`` for ``seconds`` after a warm-up: samples/s and the median batch time."""
    for _ in range(warmup_runs):
        session.run(None, dict(feeds))
    batch = int(next(iter(feeds.values())).shape[0])
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        began = time.perf_counter()
        session.run(None, dict(feeds))
        times.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    ordered = sorted(times)
    return {
        "samples_per_s": len(times) * batch / elapsed,
        "runs": len(times),
        "batch": batch,
        "batch_ms_median": statistics.median(times) * 1e3,
        "batch_ms_p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
    }


def check(url: str, request: kserve.HttpRequest, expected: Mapping[str, np.ndarray], tolerance: float = 1e-3) -> None:
    """One request must answer 200 with outputs equal to the in-process ones (so the load measures real work)."""
    status, body, headers = httpclient.fetch(url, request)
    if status != 200:
        raise RuntimeError(f"{url}{request.path} answered {status}: {body[:300]!r}")
    outputs = kserve.decode_response(body, headers)
    for name, want in expected.items():
        got = outputs[name]
        if got.shape != want.shape or not np.allclose(got, want, rtol=tolerance, atol=tolerance):
            raise RuntimeError(f"{url}{request.path}: output {name} differs from in-process ONNX Runtime")


def pin_self(cpus: set[int] | None) -> None:
    """Pin this process's main thread (and the threads it starts later) to ``cpus``; None = every CPU."""
    os.sched_setaffinity(0, cpus or set(range(os.cpu_count() or 1)))


def knob(settings: Mapping[str, str], name: str) -> Any:
    """A serving setting's value in effect for a server started with ``settings`` (``SLIMSERVE_*`` overrides)."""
    from service.settings import Settings

    raw = settings.get(f"SLIMSERVE_{name.upper()}")
    if raw is None:
        return Settings.model_fields[name].default
    return Settings.model_validate({name: raw}).model_dump()[name]


def part_efficiency(args: argparse.Namespace, work: Path, settings: dict[str, str]) -> dict[str, Any]:
    """1: BERT batch-32 requests at ``--concurrency`` vs in-process ORT at batch 32."""
    from bench.models import BERT_OUTPUT, bert_inputs, bert_sample

    pin_self(None)
    model = export_bert(work / "bert.onnx", args.bert_layers, args.seq_len)
    sample = bert_sample(work / "bert.npz", n=32, seq_len=args.seq_len)
    feeds = bert_inputs(args.bert_batch, args.seq_len, seed=7)
    settings = {"SLIMSERVE_INFERENCE_TIMEOUT_SECONDS": "600", **settings}  # 64 queued 1-s batches outlast 30 s
    with procs.slimserve(work / "home-bert", cpus=None, settings=settings) as server:
        job = procs.upload(server.url, model, sample, {"name": "bert", **JOB})
        procs.wait_ready(server.url, "/v2/models/bert/versions/1/ready")
        served_model = procs.download_version(server.url, "bert", 1, work / "bert-v1.onnx")
        session = session_for(served_model)
        expected = {BERT_OUTPUT: session.run(None, feeds)[0]}
        request = kserve.binary_request("/v2/models/bert/versions/1/infer", feeds)
        check(server.url, request, expected)
        before = inprocess(session, feeds, args.bert_inprocess_seconds)
        served = measured(
            server,
            "bert",
            lambda: loadgen.closed_loop(
                server.url,
                request,
                concurrency=args.concurrency,
                warmup_s=args.bert_warmup,
                duration_s=args.bert_duration,
                server_cpu=server.cpu_seconds,
            ),
        )
    after = inprocess(session, feeds, args.bert_inprocess_seconds)  # server stopped: nothing else runs
    baseline = (before["samples_per_s"] + after["samples_per_s"]) / 2
    job_seconds = job["finished_at"] - job["started_at"] if job.get("finished_at") and job.get("started_at") else None
    return {
        "job_seconds": job_seconds,
        "settings": settings,
        "inprocess_before": before,
        "inprocess_after": after,
        "inprocess_samples_per_s": baseline,
        "served": served,
        "ratio": served["samples_per_s"] / baseline if baseline else 0.0,
    }


def parts_mlp(args: argparse.Namespace, work: Path, settings: dict[str, str], parts: set[str]) -> dict[str, Any]:
    """2-4 on the pinned CPUs: MLP JSON vs LitServe, 64 KB binary vs JSON, open-loop p99 at half the peak."""
    results: dict[str, Any] = {}
    server_cpus, client_cpus = args.server_cpus, args.client_cpus
    threads = len(server_cpus) if server_cpus else 0
    if threads:
        settings = {"SLIMSERVE_INFERENCE_THREADS": str(threads), **settings}
    results["settings"] = settings
    mlp = build_mlp(work / "mlp.onnx", (64, 256, 256, 10))
    wide = build_mlp(work / "wide.onnx", (16384, 64, 10), seed=1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 64), dtype=np.float32)
    x_wide = rng.standard_normal((1, 16384), dtype=np.float32)
    reference = session_for(mlp, threads)
    expected = {"logits": reference.run(None, {"x": x})[0]}
    mlp_json = kserve.json_request("/v2/models/mlp/versions/1/infer", {"x": x})
    run = {"concurrency": args.concurrency, "warmup_s": args.warmup, "duration_s": args.duration}

    if "overhead" in parts:
        lit_request = kserve.HttpRequest("/predict", mlp_json.body, mlp_json.headers)
        with procs.litserve(
            mlp,
            work,
            cpus=server_cpus,
            threads=threads,
            python=args.litserve_python,
            max_batch_size=32,
            batch_timeout=0.002,
        ) as lit:
            pin_self(client_cpus)
            check(lit.url, lit_request, expected)
            results["litserve_mlp_json"] = loadgen.closed_loop(
                lit.url, lit_request, server_cpu=lit.cpu_seconds, **run
            ).as_dict()
            pin_self(None)

    pin_self(None)
    with procs.slimserve(work / "home-mlp", cpus=server_cpus, settings=settings) as server:
        data = work / "mlp.npz"
        np.savez(data, x=rng.standard_normal((64, 64), dtype=np.float32))
        procs.upload(server.url, mlp, data, {"name": "mlp", **JOB})
        procs.wait_ready(server.url, "/v2/models/mlp/versions/1/ready")
        pin_self(client_cpus)
        check(server.url, mlp_json, expected)
        if parts & {"overhead", "latency"}:
            results["slimserve_mlp_json"] = measured(
                server, "mlp", lambda: loadgen.closed_loop(server.url, mlp_json, server_cpu=server.cpu_seconds, **run)
            )
        if "binary" in parts:
            pin_self(None)
            np.savez(data, x=rng.standard_normal((16, 16384), dtype=np.float32))
            procs.upload(server.url, wide, data, {"name": "wide", **JOB})
            procs.wait_ready(server.url, "/v2/models/wide/versions/1/ready")
            pin_self(client_cpus)
            want = {"logits": session_for(wide, threads).run(None, {"x": x_wide})[0]}
            path = "/v2/models/wide/versions/1/infer"
            for label, request in (
                ("json", kserve.json_request(path, {"x": x_wide})),
                ("binary", kserve.binary_request(path, {"x": x_wide})),
            ):
                check(server.url, request, want)
                results[f"slimserve_wide_{label}"] = measured(
                    server,
                    "wide",
                    partial(loadgen.closed_loop, server.url, request, server_cpu=server.cpu_seconds, **run),
                )
                results[f"slimserve_wide_{label}"]["body_bytes"] = len(request.body)
        if "latency" in parts:
            peak = args.rate * 2 if args.rate else results["slimserve_mlp_json"]["requests_per_s"]
            results["latency"] = at_half_peak(args, server, "mlp", reference, mlp_json, peak, {"x": x}, settings)
        pin_self(None)
    return results


def _cpus(text: str | None) -> set[int] | None:
    return {int(part) for part in text.split(",") if part.strip()} if text else None


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description="Benchmark slimserve's KServe v2 serving against ORT and LitServe.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per closed/open-loop run")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run")
    parser.add_argument("--bert-duration", type=float, default=30.0)
    parser.add_argument("--bert-warmup", type=float, default=10.0)
    parser.add_argument("--bert-inprocess-seconds", type=float, default=15.0)
    parser.add_argument("--bert-batch", type=int, default=32)
    parser.add_argument("--bert-layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--bert-latency-duration", type=float, default=60.0, help="measured seconds of part 4's open loop on BERT"
    )
    parser.add_argument("--rate", type=float, help="open-loop rate for part 4 when part 2 is not run")
    parser.add_argument("--server-cpus", help="CPUs for the servers in parts 2-4 (default: all but the first)")
    parser.add_argument("--client-cpus", help="CPUs for the load generator in parts 2-4 (default: the first)")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="SLIMSERVE_KEY=VALUE",
        help="a setting for every slimserve server (repeatable)",
    )
    parser.add_argument("--litserve-python", default=sys.executable, help="the Python that has litserve installed")
    add_output_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected parts; print the markdown section; 0 unless a server could not be benchmarked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if parts - set(PARTS):
        raise SystemExit(f"unknown part(s): {', '.join(sorted(parts - set(PARTS)))}")
    if "latency" in parts and "overhead" not in parts and not args.rate:
        parts.add("overhead")  # part 4's rate is half of part 2's peak
    cpus = sorted(os.sched_getaffinity(0))
    args.server_cpus, args.client_cpus = _cpus(args.server_cpus), _cpus(args.client_cpus)
    if args.no_pin or len(cpus) < 2:
        args.server_cpus = args.client_cpus = None
    else:
        args.client_cpus = args.client_cpus or {cpus[0]}
        args.server_cpus = args.server_cpus or set(cpus) - args.client_cpus
    settings = dict(item.split("=", 1) for item in args.server_env)
    info = machine(argv, args)
    info["load_before"] = os.getloadavg()[0]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="slimserve-serving-bench-") as temp:
        work = Path(temp)
        if "efficiency" in parts:
            results["efficiency"] = part_efficiency(args, work, settings)
        if parts & {"overhead", "binary", "latency"}:
            results["mlp"] = parts_mlp(args, work, settings, parts)
        if "latency-compute" in parts:
            results["latency_compute"] = part_compute_bound(args, work, settings)
        if "latency-bert" in parts:
            results["latency_bert"] = part_bert(args, work, settings)
    info["load_after"] = os.getloadavg()[0]
    publish(markdown(info, results), {"machine": info, "results": results}, args.markdown, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
