"""`slimserve optimize`: the optimizer on the command line.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, nothing left in --out);
1 an unexpected internal error (one line; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from optimizer.errors import OptimizerError
from optimizer.report import Report


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``slimserve optimize ...``)."""
    parser = argparse.ArgumentParser(prog="slimserve", description="Optimize and serve ML models.")
    commands = parser.add_subparsers(dest="command", required=True)
    opt = commands.add_parser("optimize", help="optimize a model file offline")
    opt.add_argument("model", type=Path, help="ONNX (.onnx), TorchScript (.pt) or torch.export (.pt2) file")
    opt.add_argument("--data", type=Path, required=True, help="sample data .npz (one array per input, optional labels)")
    opt.add_argument("--out", type=Path, required=True, help="output folder (model.onnx, report.json, report.html)")
    opt.add_argument("--max-accuracy-drop", type=float, default=0.01, help="allowed drop in the metric's units")
    opt.add_argument("--relative", action="store_true", help="the allowed drop is a fraction of the baseline metric")
    opt.add_argument(
        "--task",
        choices=["auto", "classification", "regression", "fidelity"],
        default="auto",
        help="what accuracy means (auto: from the labels; fidelity ignores labels)",
    )
    opt.add_argument(
        "--metric",
        help="primary metric: top1/top5 (classification), mse/mae (regression), cosine/max_rel_error (fidelity)",
    )
    opt.add_argument("--objective", choices=["throughput", "latency", "size"], default="throughput")
    opt.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    opt.add_argument("--time-budget", type=float, default=900.0, metavar="SECONDS")
    opt.add_argument("--batch-size", type=int, default=32, help="serving batch size for throughput")
    opt.add_argument("--techniques", help="comma-separated recipe names (default: all)")
    opt.add_argument("--no-fallback", action="store_true", help="skip the accuracy-aware quantization fallback")
    opt.add_argument(
        "--finetune-search",
        choices=["none", "grid", "random"],
        default="none",
        help="learning-rate / batch-size search when fine-tuning after pruning (each trial early-stopped)",
    )
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    opt.add_argument("--latency-seconds", type=float, default=2.0, help="timing per batch size per model")
    opt.add_argument("--quiet", action="store_true", help="no progress display or table")
    opt.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return parser


def summary_table(report: Report) -> Table:
    """The before/after table: the baseline and every candidate, chosen marked."""
    metric = report.baseline.accuracy.metric
    table = Table(title=f"slimserve: chosen = {report.chosen}")
    for column in ("model", metric, "drop", "p50 ms", "p99 ms", "samples/s", "speedup", "MB", "verdict"):
        table.add_column(column, justify="left" if column in ("model", "verdict") else "right")
    base = report.baseline
    table.add_row(
        "original", f"{base.accuracy.value:.4f}", "-", f"{base.latency_ms.p50:.2f}", f"{base.latency_ms.p99:.2f}",
        f"{base.throughput:.0f}", "1.00x", f"{base.size_bytes / 1e6:.2f}", "baseline",
    )  # fmt: skip
    for c in report.candidates:
        verdict = "CHOSEN" if c.name == report.chosen else ("ok" if c.accepted else "rejected")
        table.add_row(
            c.name, f"{c.accuracy.value:.4f}", f"{c.accuracy_drop:+.4f}", f"{c.latency_ms.p50:.2f}",
            f"{c.latency_ms.p99:.2f}", f"{c.throughput:.0f}", f"{c.speedup:.2f}x", f"{c.size_bytes / 1e6:.2f}",
            verdict,
        )  # fmt: skip
    return table


def _optimize(args: argparse.Namespace, console: Console) -> int:
    from optimizer.pipeline import OptimizeConfig, optimize  # heavy imports only when running

    techniques = tuple(t.strip() for t in args.techniques.split(",") if t.strip()) if args.techniques else None
    config = OptimizeConfig(
        max_accuracy_drop=args.max_accuracy_drop,
        relative=args.relative,
        task=args.task,
        metric=args.metric,
        objective=args.objective,
        device=args.device,
        time_budget_s=args.time_budget,
        serving_batch_size=args.batch_size,
        techniques=techniques,
        finetune_search=args.finetune_search,
        fallback=not args.no_fallback,
        seed=args.seed,
        intra_op_threads=args.threads,
        latency_seconds=args.latency_seconds,
    )
    if args.quiet:
        report = optimize(args.model, args.data, args.out, config)
    else:
        columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("starting", total=1.0)

            def show(stage: str, fraction: float) -> None:
                bar.update(task, description=stage, completed=fraction)

            report = optimize(args.model, args.data, args.out, config, progress=show)
        console.print(summary_table(report))
        console.print(report.chosen_reason)
        console.print(f"report: {args.out / 'report.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimserve`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # A pipe or a log file gets a wide table instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=150)
    errors = Console(stderr=True)
    try:
        return _optimize(args, console)
    except OptimizerError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        errors.print(f"error: invalid option {field}: {first['msg']}", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted", markup=False)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        errors.print(f"internal error: {type(exc).__name__}: {exc}", markup=False, soft_wrap=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
