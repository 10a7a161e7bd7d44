"""The soak's picture: latency per 10-second window and the server's memory and descriptors over time.

    python bench/soak_plot.py bench/results/soak.json bench/plots/soak.png

``bench/soak_bench.py`` draws it to ``bench/plots/soak.png`` (kept in git, unlike bench/results/)
when it writes its markdown section; this script redraws it from a run's JSON.
Drawn with matplotlib's object-oriented API (no global state).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Where the soak's picture goes, and the markdown showing it (relative to bench/RESULTS.md).
PICTURE = Path(__file__).resolve().parent / "plots" / "soak.png"
IMAGE = "![Soak: latency per 10 s window, server memory and descriptors over time](plots/soak.png)"


def draw(results: dict[str, Any], path: Path) -> None:
    """Write the soak's picture to ``path`` (PNG): latency per window when recorded, RSS and descriptors."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    soaked = results["soak"]
    timeline = soaked["load"].get("timeline") or []
    samples = soaked["samples"]
    rows = 2 if timeline else 1
    figure = Figure(figsize=(9, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    if timeline:
        latency = axes[0]
        starts = [window["start_s"] for window in timeline]
        for key, label in (("p50", "p50"), ("p99", "p99"), ("max", "max")):
            values = [window[key] if window[key] is not None else float("nan") for window in timeline]
            latency.plot(starts, values, label=label, drawstyle="steps-post")
        failed = [window["start_s"] for window in timeline if window["failed"]]
        if failed:
            latency.scatter(failed, [1.0] * len(failed), marker="x", color="red", label="failed requests")
        latency.set_yscale("log")
        latency.set_ylabel("latency, ms (10 s windows)")
        latency.legend(loc="upper right")
        latency.set_title(f"{soaked['rate']:.0f} req/s open loop, an upload and its job every minute")
    memory = axes[-1]
    seconds = [sample[0] for sample in samples]
    memory.plot(seconds, [sample[1] / 2**20 for sample in samples], color="tab:blue", label="RSS")
    memory.set_ylabel("server RSS, MiB", color="tab:blue")
    memory.set_xlabel("seconds since the soak began")
    descriptors = memory.twinx()
    descriptors.plot(seconds, [sample[2] for sample in samples], color="tab:orange", label="descriptors")
    descriptors.set_ylabel("descriptors other than sockets", color="tab:orange")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> int:
    """Redraw the picture from a soak JSON file."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    draw(json.loads(Path(args[0]).read_text())["results"], Path(args[1]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
