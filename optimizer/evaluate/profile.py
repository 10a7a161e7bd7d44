"""Where the time goes: ONNX Runtime's built-in profiler, aggregated per executed node.

The session is created with ``enable_profiling`` and its trace written into a private temporary
folder, which is removed with the trace whatever happens. The trace is Chrome trace-event JSON;
events with ``cat == "Node"`` named ``<node>_kernel_time`` carry the operator (``args.op_name``)
and the duration in microseconds. Node names are those ONNX Runtime executes, so after graph
optimization a fused node (e.g. ``fc1/MatMulAddFusion``, a Gemm) stands for the nodes it replaced.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.evaluate.latency import run_feed
from optimizer.report import OpTiming
from optimizer.runtime import RuntimeOptions, create_session

_log = logging.getLogger(__name__)

_SUFFIX = "_kernel_time"


def bottlenecks(
    model_path: Path,
    feed: dict[str, np.ndarray],
    options: RuntimeOptions,
    *,
    top: int = 10,
    runs: int = 5,
) -> list[OpTiming]:
    """The ``top`` nodes by total kernel time over ``runs`` runs of ``feed``, worst first.

    Each entry has the node's total milliseconds, its number of calls and its share (0..1) of all
    profiled node time. An unreadable trace gives an empty list (logged); a model that fails to
    load or run raises :class:`~optimizer.errors.InvalidModel`.
    """
    with tempfile.TemporaryDirectory(prefix="slimserve-profile-") as folder:
        session = create_session(
            Path(model_path),
            options,
            enable_profiling=True,
            profile_file_prefix=str(Path(folder) / "trace"),
        )
        try:
            for _ in range(max(runs, 1)):
                run_feed(session, feed)
        finally:
            trace = Path(session.end_profiling())
        try:
            events = json.loads(trace.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            _log.debug("cannot read the ONNX Runtime profile: %s", exc)
            return []
        finally:
            trace.unlink(missing_ok=True)  # normally inside ``folder``; removed here in any case
    return aggregate(events, top=top)


def aggregate(events: Any, *, top: int = 10) -> list[OpTiming]:
    """Per-node totals from a parsed ONNX Runtime trace (a list of events, or ``{"traceEvents": [...]}``)."""
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    totals: dict[str, list[Any]] = {}  # node -> [op_type, total_us, calls]
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, dict) or event.get("cat") != "Node":
            continue
        name = str(event.get("name", ""))
        if not name.endswith(_SUFFIX):
            continue
        args = event.get("args")
        if not isinstance(args, dict):
            args = {}
        node = name[: -len(_SUFFIX)]
        entry = totals.setdefault(node, [str(args.get("op_name", "")), 0.0, 0])
        entry[1] += float(event.get("dur", 0) or 0)
        entry[2] += 1
    grand = sum(entry[1] for entry in totals.values())
    ranked = sorted(totals.items(), key=lambda item: (-item[1][1], item[0]))
    return [
        OpTiming(
            node=node,
            op_type=op_type,
            total_ms=total_us / 1000.0,
            calls=calls,
            share=total_us / grand if grand > 0 else 0.0,
        )
        for node, (op_type, total_us, calls) in ranked[: max(top, 0)]
    ]
