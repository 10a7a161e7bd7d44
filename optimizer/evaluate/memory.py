"""Peak memory of loading a model and running one feed, measured in a fresh child process.

A fresh child interpreter (started by :func:`optimizer.sandbox.run_isolated`) keeps the parent's
allocations out of the number. The child resets the
kernel's high-water mark (``/proc/self/clear_refs``), records its resident size with psutil,
creates the session, runs the feed and reads the new high-water mark (``VmHWM``); the result is the
difference. ``getrusage(RUSAGE_SELF).ru_maxrss`` is only a fallback where ``/proc`` is missing: on
Linux a spawned child inherits the parent's maximum across fork+exec, so a child of a large
process would report the parent's peak instead of its own. Any failure returns None: a memory
figure is informative, never a reason to fail an optimization.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

from optimizer.runtime import RuntimeOptions, create_session

_log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory(
    model_path: Path,
    feed: dict[str, np.ndarray],
    options: RuntimeOptions,
    runs: int = 3,
    *,
    timeout_s: float = 120.0,
) -> int | None:
    """Extra peak resident bytes of creating a session for ``model_path`` and running ``feed``.

    Measured in a fresh child interpreter (the sandbox's launcher, without its memory cap); None
    when the child fails, crashes or exceeds ``timeout_s`` (the reason is logged at debug level).
    """
    from optimizer.errors import OptimizerError
    from optimizer.sandbox import SandboxLimits, run_isolated

    limits = SandboxLimits(memory_bytes=None, timeout_s=timeout_s)
    try:
        peak = run_isolated(_measure, Path(model_path), feed, options, max(runs, 1), limits=limits)
    except OptimizerError as exc:
        _log.debug("memory measurement failed: %s", exc)
        return None
    return int(peak)


def _measure(model_path: Path, feed: dict[str, np.ndarray], options: RuntimeOptions, runs: int) -> int:
    import psutil

    _reset_peak()
    before = int(psutil.Process().memory_info().rss)
    session = create_session(model_path, options)
    for _ in range(runs):
        session.run(None, feed)
    return max(_peak_rss() - before, 0)


def _reset_peak() -> None:
    """Reset this process's resident high-water mark to its current size (Linux 4.0+)."""
    # Not Linux or not permitted: the peak then also covers the imports, a small overcount.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def _peak_rss() -> int:
    """This process's peak resident bytes: VmHWM from /proc, else ru_maxrss."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
