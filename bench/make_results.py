"""Write bench/RESULTS.md from the sections the benchmarks wrote and the notes written by hand.

    python bench/make_results.py [--results bench/results] [--notes bench/notes] [--out bench/RESULTS.md]

Each benchmark prints a markdown section with its machine, versions, date, exact command and
targets, and ``make bench`` saves it under ``bench/results/`` (optimizer.md, service.md,
serving.md, soak.md). ``bench/notes/`` holds what a script cannot write: why a target is missed,
what was tried, earlier runs; each note is dated in its own text. This script puts them together in
a fixed order, so ``make bench`` regenerates the whole file; a part whose section is missing says
which command writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (heading, the benchmark's section file, the command that writes it, notes files), in order.
PARTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "Optimizer (issues 2 and 5)",
        "optimizer.md",
        "python bench/optimizer_bench.py --out bench/results --markdown bench/results/optimizer.md",
        ("optimizer.md", "pruning.md"),
    ),
    (
        "Service: uploads and job status (issue 3)",
        "service.md",
        "python bench/service_bench.py --out bench/results/service.json --markdown bench/results/service.md",
        ("service.md",),
    ),
    (
        "Serving: efficiency, overhead, batching latency (issue 4)",
        "serving.md",
        "python bench/serving_bench.py --out bench/results/serving.json --markdown bench/results/serving.md",
        ("serving.md",),
    ),
    (
        "Load, soak and burst (issue 7)",
        "soak.md",
        "python bench/soak_bench.py --out bench/results/soak.json --markdown bench/results/soak.md",
        ("soak.md",),
    ),
)

HEADER = """# Benchmark results

Put together by `bench/make_results.py` ({date}; `make bench` runs every benchmark, then it): each
part below is the latest section its benchmark wrote (machine, versions, date and exact command
inside; a benchmark run alone updates only its own part), followed by notes
written by hand (analysis, what was tried, earlier runs; each dated). Timings on these shared
2-core machines vary by up to ±25% between runs: compare ratios within one run, never absolute
figures across runs.
"""


def render(results: Path, notes: Path, date: str) -> str:
    """The whole file."""
    out = [HEADER.format(date=date)]
    for heading, section, command, note_files in PARTS:
        out.append(f"# {heading}\n")
        generated = results / section
        if generated.is_file():
            out.append(_demote(generated.read_text(encoding="utf-8")).strip() + "\n")
        else:
            out.append(f"_Not run in this generation: `{command}` writes this section._\n")
        for name in note_files:
            note = notes / name
            if note.is_file():
                out.append(note.read_text(encoding="utf-8").strip() + "\n")
    return "\n".join(out)


def _demote(text: str) -> str:
    """Headings one level down, so every benchmark's own ``##`` sits under this file's ``#`` parts."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    """Write the file; print where."""
    parser = argparse.ArgumentParser(description="Assemble bench/RESULTS.md.")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--notes", type=Path, default=ROOT / "bench" / "notes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="minutes")
    args.out.write_text(render(args.results, args.notes, date), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
