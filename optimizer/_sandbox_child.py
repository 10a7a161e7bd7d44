"""The child side of :mod:`optimizer.sandbox` (limits, the call, the reply, events) and the wire format.

The bootstrap imports only this module (not the parent side), so a child starts without pydantic
or anything else the parent needs. :func:`emit` is the one function sandboxed code calls: it sends
a small JSON object to the parent on a second pipe, one line each (never pickle: the parent does
not trust the child, and JSON needs no restricted unpickler); :class:`EventLines` is the parent's
decoder of that pipe, kept here so both ends of the format live side by side.

``RLIMIT_AS`` is clamped to the hard limit the child inherited: a sandbox started inside another
sandbox (the optimizer validates models in children of its own) may not raise the outer limit,
and an unprivileged process that tried would fail to start at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import resource
import signal
import struct
import sys
import threading
from typing import Any

from optimizer.errors import OptimizerError, first_line

#: Length prefix of the reply frame.
HEADER = struct.Struct("!Q")
#: Longest event line, newline included; the parent drops longer lines.
MAX_EVENT_BYTES = 4096

_event_fd: int | None = None
_event_lock = threading.Lock()


def emit(event: dict[str, Any]) -> None:
    """Send ``event`` (a JSON-serialisable dict) to the parent's ``on_event`` callback.

    A no-op outside a sandbox child or when the parent gave no ``on_event``. An event that does
    not serialise to one line of at most :data:`MAX_EVENT_BYTES` is dropped: events are
    informative (progress), never a reason to fail the call. Blocks only while the parent's pipe is
    full (the parent reads it continuously).
    """
    fd = _event_fd
    if fd is None or not isinstance(event, dict):
        return
    try:
        line = json.dumps(event, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError):
        return
    if len(line) > MAX_EVENT_BYTES:
        return
    with _event_lock, contextlib.suppress(OSError):  # the parent went away: nobody to tell
        _write_all(fd, line)


class EventLines:
    """Decoder of the event pipe: bytes in, complete, bounded, well-formed JSON objects out.

    A line of :data:`MAX_EVENT_BYTES` or more (newline included) is dropped whole, without being
    buffered; so is a line that is not a JSON object (or holds NaN/Infinity, or nests absurdly).
    """

    def __init__(self) -> None:
        self._partial = bytearray()
        self._skipping = False  # inside a line that grew past the limit: drop up to its newline

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The events completed by ``chunk``, in order."""
        events: list[dict[str, Any]] = []
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if not self._skipping:
                    self._partial += chunk[start:]
                    if len(self._partial) >= MAX_EVENT_BYTES:
                        self._partial.clear()
                        self._skipping = True
                return events
            if self._skipping:
                self._skipping = False
            else:
                self._partial += chunk[start:newline]
                line = bytes(self._partial)
                self._partial.clear()
                event = _decode(line) if len(line) < MAX_EVENT_BYTES else None
                if event is not None:
                    events.append(event)
            start = newline + 1


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # malformed, not UTF-8, NaN/Infinity or absurdly nested
        return None
    return event if isinstance(event, dict) else None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not plain JSON")


def child_main(config: dict[str, Any]) -> None:
    """Entry point of the child (called by the bootstrap): limits, the call, the reply, exit."""
    global _event_fd
    fd = int(config["result_fd"])
    memory_reply = frame(pickle.dumps(("memory",)))  # built before the call: no memory needed later
    _set_parent_death_signal(int(config["parent_pid"]))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if config["memory_bytes"] is not None:
        limit = clamp_to_hard_limit(int(config["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if config.get("nice"):
        os.nice(int(config["nice"]))  # inherited by every thread and process the call starts
    if config.get("event_fd") is not None:
        _event_fd = int(config["event_fd"])
    try:
        payload = frame(_reply_for_call(config["call_path"]))
    except MemoryError:
        payload = memory_reply
    try:
        _write_all(fd, payload)
    except MemoryError:
        _write_all(fd, memory_reply)
    finally:
        os._exit(0)  # skip interpreter teardown: native libraries sometimes crash in it


def clamp_to_hard_limit(limit: int) -> int:
    """``limit`` lowered to the current hard ``RLIMIT_AS`` when that is lower (never raised)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < limit:
        return hard
    return limit


def _reply_for_call(call_path: str) -> bytes:
    try:
        with open(call_path, "rb") as fh:
            func, args, kwargs = pickle.load(fh)
        result = func(*args, **kwargs)
        return pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL)
    except MemoryError:
        raise
    except OptimizerError as exc:
        kind = type(exc)
        return pickle.dumps(("raise", kind.__module__, kind.__qualname__, str(exc)))
    except BaseException as exc:
        if is_out_of_memory(exc):
            raise MemoryError from exc
        return pickle.dumps(("error", type(exc).__name__, first_line(exc)))


def is_out_of_memory(exc: BaseException) -> bool:
    """True when a native library reported an allocation failure (torch, ONNX Runtime, C++)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


#: How native libraries word an allocation failure under an address-space limit: C++ bad_alloc,
#: malloc's ENOMEM ("cannot allocate memory", pthread_create's "error code: 12") and the dynamic
#: loader failing to map a shared library.
_OOM_MARKERS = (
    "bad_alloc",
    "bad allocation",
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate memory",
    "out of memory",
    "failed to map segment",
    "pthread_create failed, error code: 12",
)


def frame(data: bytes) -> bytes:
    """``data`` with its length prefix (the reply's wire format)."""
    return HEADER.pack(len(data)) + data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _set_parent_death_signal(parent_pid: int) -> None:
    """Linux: SIGKILL this child when the parent dies, so a killed worker leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
