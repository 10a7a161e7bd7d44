"""Peak memory of loading a model and running one feed, measured in a fresh child process.

A fresh ``spawn`` child keeps the parent's allocations out of the number. The child resets the
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
import multiprocessing
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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

    Measured in a ``spawn`` child process; None when the child fails, crashes or exceeds
    ``timeout_s`` (the reason is logged at debug level).
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    # Not a daemon (a daemonic process may not start children of its own); the finally block
    # below reaps the child instead.
    process = ctx.Process(
        target=_child, args=(str(model_path), feed, options, max(runs, 1), sender), name="slimserve-memory"
    )
    try:
        process.start()
        sender.close()
        if not receiver.poll(timeout_s):
            _log.debug("memory measurement timed out after %.0f s", timeout_s)
            return None
        outcome: tuple[str, Any] = receiver.recv()
    except (OSError, EOFError, RuntimeError) as exc:  # child died, could not start, or pipe broke
        _log.debug("memory measurement failed: %s", exc)
        return None
    finally:
        receiver.close()
        _reap(process)
    status, value = outcome
    if status != "ok":
        _log.debug("memory measurement failed in the child: %s", value)
        return None
    return int(value)


def _reap(process: multiprocessing.process.BaseProcess) -> None:
    if process.pid is None:  # never started
        return
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()


def _child(model_path: str, feed: dict[str, np.ndarray], options: RuntimeOptions, runs: int, conn: Connection) -> None:
    """Child-process entry: send ``("ok", bytes)`` or ``("error", one line)`` through ``conn``."""
    try:
        conn.send(("ok", _measure(Path(model_path), feed, options, runs)))
    except BaseException as exc:  # report anything, never let the child hang the parent
        lines = str(exc).strip().splitlines()
        conn.send(("error", f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"))
    finally:
        conn.close()


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
