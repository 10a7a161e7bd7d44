"""The serving benchmark's machine record and its markdown section for bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def machine(argv: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """The optimizer benchmark's machine record plus the serving stack's versions and the CPU plan."""
    from bench.optimizer_bench import machine_info

    info = machine_info(["bench/serving_bench.py", *argv])
    for package in ("litserve", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "orjson"):
        try:
            info["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info["versions"][package] = "not installed"
    info["server_cpus"] = sorted(args.server_cpus or [])
    info["client_cpus"] = sorted(args.client_cpus or [])
    return info


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--out`` (the figures as JSON) and ``--markdown`` (the section), as every benchmark takes them."""
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the markdown section to this file")


def publish(section: str, payload: Mapping[str, Any], markdown_path: Path | None, json_path: Path | None) -> None:
    """Print a benchmark's markdown section; also write it and its figures (JSON) where asked."""
    print(section)
    if markdown_path:
        markdown_path.write_text(section)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def status(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ms(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def _latency_row(label: str, lat: dict[str, Any]) -> str:
    opened, p99 = lat["open_loop"], lat["open_loop"]["latency_ms"].get("p99")
    compute_ms, bound = lat["compute"]["batch_ms_median"], lat["bound_ms"]
    return (
        f"| 4 | {label} open loop at {opened['offered_rate']:.0f} req/s (half of "
        f"{lat['peak_requests_per_s']:.0f}): p99 | {ms(p99)} ms | <= {lat['max_queue_delay_ms']:.1f} ms queue "
        f"delay + 2 x {compute_ms:.2f} ms (batch {lat['max_batch_size']}) = {bound:.1f} ms | "
        f"{status(p99 is not None and p99 <= bound)} |"
    )


def markdown(info: dict[str, Any], results: dict[str, Any]) -> str:
    """The section for bench/RESULTS.md."""
    lines = [
        f"## Serving benchmark, {info['date']}",
        "",
        f"- machine: {info['cpu']}, {info['physical_cores']} physical / {info['logical_cores']} logical cores, "
        f"{info['memory_gib']} GiB, {info['os']}",
        f"- python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- command: `{info['command']}`; 1-minute load average before/after: {info['load_before']:.1f} / "
        f"{info['load_after']:.1f}",
        f"- CPUs: parts 2-4 pin the load generator to {info['client_cpus'] or 'all'} and the servers to "
        f"{info['server_cpus'] or 'all'} (`taskset`), ONNX Runtime with one intra-op thread per server CPU; part 1 "
        "is not pinned (server and in-process baseline both get every core)",
        "- load generator: `bench/loadgen.py`, keep-alive HTTP/1.1 on uvloop + httptools, closed loops with one "
        "connection each; open loop with latency from the scheduled send time (coordinated omission counted)",
        "- slimserve settings other than the defaults: "
        + "; ".join(
            f"{label}: " + (", ".join(f"`{k}={v}`" for k, v in part["settings"].items()) or "none")
            for label, part in (("part 1", results.get("efficiency")), ("parts 2-4", results.get("mlp")))
            if part
        )
        + " (64 queued 1-s BERT batches outlast the default 30 s request timeout)",
        "",
        "| # | measure | result | target | status |",
        "|---|---|---:|---|---|",
    ]
    eff = results.get("efficiency")
    if eff:
        served = eff["served"]
        lines.append(
            f"| 1 | BERT encoder, batch-32 binary requests, c={served['concurrency']}: served vs in-process ORT "
            f"samples/s | {served['samples_per_s']:.1f} vs {eff['inprocess_samples_per_s']:.1f} "
            f"({eff['ratio']:.0%}) | >= 90% | {status(eff['ratio'] >= 0.9)} |"
        )
    mlp = results.get("mlp", {})
    if "litserve_mlp_json" in mlp and "slimserve_mlp_json" in mlp:
        ours, theirs = mlp["slimserve_mlp_json"], mlp["litserve_mlp_json"]
        ratio = ours["requests_per_s"] / max(theirs["requests_per_s"], 1e-9)
        p99_ours, p99_theirs = ours["latency_ms"].get("p99"), theirs["latency_ms"].get("p99")
        lower = p99_ours is not None and (p99_theirs is None or p99_ours < p99_theirs)
        lines += [
            f"| 2 | MLP 64-256-256-10, JSON, batch 1, c={ours['concurrency']}: slimserve vs LitServe requests/s "
            f"| {ours['requests_per_s']:.0f} vs {theirs['requests_per_s']:.0f} ({ratio:.1f}x) | >= 4x | "
            f"{status(ratio >= 4)} |",
            f"| 2 | same: p99 latency slimserve vs LitServe | {ms(p99_ours)} vs {ms(p99_theirs)} ms | lower | "
            f"{status(lower)} |",
        ]
    if "slimserve_wide_binary" in mlp:
        binary, plain = mlp["slimserve_wide_binary"], mlp["slimserve_wide_json"]
        ratio = binary["requests_per_s"] / max(plain["requests_per_s"], 1e-9)
        lines.append(
            f"| 3 | MLP with a 64 KB input (16384 FP32), c={binary['concurrency']}: binary vs JSON requests/s "
            f"({binary['body_bytes'] / 1e3:.0f} vs {plain['body_bytes'] / 1e3:.0f} kB bodies) | "
            f"{binary['requests_per_s']:.0f} vs {plain['requests_per_s']:.0f} ({ratio:.1f}x) | >= 1.5x | "
            f"{status(ratio >= 1.5)} |"
        )
    for label, lat in (
        ("MLP JSON", mlp.get("latency")),
        ("memory-bound MLP 64-4096-4096-10, JSON", results.get("latency_compute")),
        ("BERT encoder, one-sample binary requests", results.get("latency_bert")),
    ):
        if lat:
            lines.append(_latency_row(label, lat))
    lines += [
        "",
        "| run | requests/s | samples/s | p50 / p90 / p99 / max ms | errors | client CPU | server CPU "
        "| in server: request / queue / batch compute ms, rows per batch (means) |",
        "|---|---:|---:|---|---|---:|---:|---|",
    ]
    runs = {"1 slimserve BERT": eff["served"]} if eff else {}
    runs.update({name.replace("_", " "): mlp[name] for name in mlp if name.startswith(("slimserve_", "litserve_"))})
    named = (("latency_compute", "slimserve heavy json"), ("latency_bert", "slimserve bert one-sample binary"))
    runs.update({name: results[key]["closed_loop"] for key, name in named if key in results})
    if "latency" in mlp:
        runs["slimserve mlp json, open loop"] = mlp["latency"]["open_loop"]
    runs.update({f"{name}, open loop": results[key]["open_loop"] for key, name in named if key in results})
    for name, run in runs.items():
        lat = run["latency_ms"]
        server_cpu = "-" if run["server_cpu"] is None else f"{run['server_cpu']:.0%}"
        lines.append(
            f"| {name} | {run['requests_per_s']:.1f} | {run['samples_per_s']:.1f} | "
            f"{ms(lat.get('p50'))} / {ms(lat.get('p90'))} / {ms(lat.get('p99'))} / {ms(lat.get('max'))} | "
            f"{run['errors'] or '-'} | {run['client_cpu']:.0%} | {server_cpu} | {_means(run.get('server_means'))} |"
        )
    if eff:
        before, after = eff["inprocess_before"], eff["inprocess_after"]
        lines += [
            "",
            f"In-process BERT at batch {before['batch']}: {before['samples_per_s']:.1f} samples/s before and "
            f"{after['samples_per_s']:.1f} after the served run (median batch {before['batch_ms_median']:.0f} ms). "
            "The served BERT latencies are those of the first round of queued requests (a full round takes longer "
            "than the run); its throughput is steady, the queue never empties.",
        ]
    lines.append("")
    return "\n".join(lines)


def _means(means: Mapping[str, float] | None) -> str:
    if not means:
        return "-"
    parts = [
        f"{means[key]:.2f}" if key in means else "?"
        for key in ("request_duration_ms", "queue_duration_ms", "compute_duration_ms")
    ]
    return " / ".join(parts) + (f", {means['batch_size']:.1f}" if "batch_size" in means else "")
