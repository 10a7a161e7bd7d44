"""Run one function in a fresh, isolated child process: scrubbed environment, memory and time limits.

``run_isolated(func, *args, **kwargs)`` pickles a top-level function and its arguments, starts a
new Python interpreter (the "spawn" model: nothing of the parent's memory is inherited), runs the
call there and hands back its result or its error.

Why not ``multiprocessing``'s spawn context itself: its launcher always passes the parent's whole
environment to the new interpreter and offers no hook to change it, and scrubbing ``os.environ``
inside the child is not enough, because ``/proc/self/environ`` keeps the environment the process
was started with. So the child is launched with :class:`subprocess.Popen` -- the same fresh
``sys.executable`` interpreter spawn would start -- with an explicit, scrubbed ``env``, in its own
session (so a timeout kills its whole process group) and in isolated mode (``-I``). Only the
parent's ``sys.path`` is passed on, so the function's module can be imported.

In the child, before the call is unpickled (which is when user-facing modules get imported):
``RLIMIT_AS`` (memory), ``RLIMIT_CORE`` = 0 (no core files from crashes) and a parent-death signal.
``HOME`` and ``TMPDIR`` point to a private temporary folder that is removed afterwards. This is
not a filesystem jail: the child runs as the same user and sees the same files (containers and
Kubernetes security contexts are the layer for that).

The reply travels back through a pipe as a pickle that the parent reads with a restricted
unpickler (plain data only, no classes), because code running in the child is not trusted: a
crafted reply must not execute code in the parent. So a sandboxed function must return plain
data: None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, pathlib
paths.

Progress and cancellation: with ``on_event``, the child gets a second pipe on which
:func:`emit` writes JSON lines (at most 4 KiB each; longer or malformed lines are dropped, and
JSON needs no trust in the sender); the parent reads them in the same ``select`` loop as the reply
and calls ``on_event`` in its own thread. ``should_stop`` is polled in that loop (every 0.2 s at
most); once it returns true the child's process group is killed and :class:`SandboxCancelled` is
raised. The child side lives in :mod:`optimizer._sandbox_child`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from optimizer._sandbox_child import HEADER, EventLines, emit, is_out_of_memory
from optimizer.errors import OptimizerError, SandboxError

__all__ = [
    "KEPT_ENV",
    "SandboxCancelled",
    "SandboxCrashed",
    "SandboxLimits",
    "child_sys_path",
    "emit",
    "is_out_of_memory",
    "run_isolated",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variables passed to the child unchanged (besides any ``LC_*``); nothing else is.
#: ``CUDA_VISIBLE_DEVICES`` and ``LD_LIBRARY_PATH`` are not secrets, and GPU containers need them
#: to find their devices and CUDA libraries; ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` keep
#: numpy's OpenBLAS on a safe kernel where a host sets them for a CPU it misdetects.
KEPT_ENV = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "OMP_WAIT_POLICY",
        "CUDA_VISIBLE_DEVICES",
        "LD_LIBRARY_PATH",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
    }
)
_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
_MAX_REPLY_BYTES = 64 * 1024**2
_POLL_S = 0.2


class SandboxLimits(BaseModel):
    """Limits of one sandboxed call.

    ``memory_bytes`` caps the child's virtual address space (``RLIMIT_AS``); torch and ONNX
    Runtime reserve far more address space than they touch (converting even a tiny torch.export
    program to ONNX on CPU needs about 1.5 GiB of it), so the default is 8 GiB; None means no cap
    (CUDA reserves huge address ranges, so GPU workers may need that). ``timeout_s`` is wall-clock time from launch.
    ``cpu_threads`` sets the usual thread-count variables (OMP, MKL, OpenBLAS) in the child.
    ``nice`` lowers the child's CPU priority by that much (0: unchanged): a background
    optimization then yields the CPU to latency-sensitive work on the same machine (serving).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_bytes: int | None = Field(default=8 * 1024**3, gt=0)
    timeout_s: float = Field(default=600.0, gt=0)
    cpu_threads: int | None = Field(default=None, ge=1)
    nice: int = Field(default=0, ge=0, le=19)


class SandboxCrashed(SandboxError):
    """The child was killed by a signal (a segfault in native code, or an outside SIGKILL)."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class SandboxCancelled(SandboxError):
    """``should_stop`` turned true while the child ran: its whole process group was killed."""


def run_isolated(
    func: Callable[..., T],
    *args: Any,
    limits: SandboxLimits = SandboxLimits(),  # noqa: B008 - frozen, so sharing the default is safe
    description: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> T:
    """Call ``func(*args, **kwargs)`` in an isolated child process and return its result.

    ``func`` must be a picklable top-level function; its arguments are pickled to the child and
    its result must be plain data (see the module docstring). ``description`` names the work in
    error messages (default: ``sandboxed <function name>``). An :class:`OptimizerError` raised in
    the child is raised again here with the same class and message; MemoryError, any other
    exception, a crash (signal) or the timeout become :class:`SandboxError` with one line.

    ``on_event`` receives each object the child passes to :func:`emit`, in order, in this thread
    (an exception it raises kills the child and propagates). ``should_stop`` is polled while the
    child runs; when it returns true the child is killed and :class:`SandboxCancelled` raised.
    """
    what = description or f"sandboxed {getattr(func, '__name__', 'call')}"
    private = Path(tempfile.mkdtemp(prefix="slimserve-sandbox-"))
    try:
        call_path = private / "call.pkl"
        with open(call_path, "wb") as fh:
            try:
                pickle.dump((func, args, kwargs), fh, protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise SandboxError(f"{what} cannot be sent to a child process: {exc}") from exc
        work = private / "tmp"
        work.mkdir()
        reply = _run_child(private, call_path, work, limits, what, _Watch(on_event, should_stop))
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return _unpack(reply, limits, what)


def _child_env(work: Path, limits: SandboxLimits) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or k.startswith("LC_")}
    env["HOME"] = str(work)
    env["TMPDIR"] = str(work)
    if limits.cpu_threads is not None:
        env.update(dict.fromkeys(_THREAD_VARS, str(limits.cpu_threads)))
    # OpenMP threads that wait by spinning (the default) starve each other and everything else
    # when the cores are shared, as they are with serving beside an in-process worker: a pruning
    # job ran 6x slower next to two busy processes (2.5x with PASSIVE, the fair share), and no
    # slower on idle cores. An operator's own OMP_WAIT_POLICY is kept.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


_BOOTSTRAP = (
    "import json, sys\n"
    "cfg = json.load(open(sys.argv[1]))\n"
    "sys.path[:] = cfg['sys_path']\n"
    "from optimizer._sandbox_child import child_main\n"
    "child_main(cfg)\n"
)


def child_sys_path() -> list[str]:
    """The parent's ``sys.path`` for the child, without entries that are package folders.

    ``onnxruntime.transformers`` appends its own package folder (which holds an ``optimizer.py``)
    to ``sys.path`` when imported; passed on, it would shadow our ``optimizer`` package in the child.
    A folder with an ``__init__.py`` is a package, never a legitimate import root.
    """
    return [os.path.abspath(p) for p in sys.path if not os.path.isfile(os.path.join(p or ".", "__init__.py"))]


class _Watch:
    """The parent's side of one call while it runs: the event pipe and the stop poll."""

    def __init__(
        self, on_event: Callable[[dict[str, Any]], None] | None, should_stop: Callable[[], bool] | None
    ) -> None:
        self.on_event = on_event
        self.should_stop = should_stop
        self._lines = EventLines()

    def stop_requested(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def read(self, fd: int) -> bool:
        """Read what the event pipe holds and deliver each complete event; False at end of file."""
        chunk = os.read(fd, 1 << 16)
        for event in self._lines.feed(chunk):
            if self.on_event is not None:
                self.on_event(event)
        return bool(chunk)

    def drain(self, fd: int) -> None:
        """Deliver what is left in the pipe, bounded (a child that keeps emitting cannot hold us here).

        Everything emitted before the reply fits in the pipe's buffer (a writer blocks when it is
        full), so a few reads are all it takes.
        """
        for _ in range(16):
            if not (select.select([fd], [], [], 0)[0] and self.read(fd)):
                return


def _run_child(private: Path, call_path: Path, work: Path, limits: SandboxLimits, what: str, watch: _Watch) -> bytes:
    """Launch the child, collect its reply; raise SandboxError on timeout, cancel, crash or no reply."""
    read_fd, write_fd = os.pipe()
    event_read, event_write = os.pipe() if watch.on_event is not None else (-1, -1)
    config = {
        "sys_path": child_sys_path(),
        "call_path": str(call_path),
        "result_fd": write_fd,
        "event_fd": event_write if event_write >= 0 else None,
        "memory_bytes": limits.memory_bytes,
        "nice": limits.nice,
        "parent_pid": os.getpid(),
    }
    config_path = private / "config.json"
    config_path.write_text(json.dumps(config))
    stderr_path = private / "stderr.log"
    deadline = time.monotonic() + limits.timeout_s
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP, str(config_path)],
                env=_child_env(work, limits),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=tuple(fd for fd in (write_fd, event_write) if fd >= 0),
                start_new_session=True,
            )
        for fd in (write_fd, event_write):
            if fd >= 0:
                os.close(fd)
        write_fd = event_write = -1
        data, outcome = _read_reply(read_fd, event_read, proc, deadline, what, watch)
        if outcome == "cancelled":
            _kill_group(proc)
            raise SandboxCancelled(f"{what} was cancelled")
        if outcome == "timeout":
            _kill_group(proc)
            raise SandboxError(f"{what} timed out after {limits.timeout_s:g} s")
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            if data is None:
                _kill_group(proc)
                raise SandboxError(f"{what} timed out after {limits.timeout_s:g} s") from None
    except OSError as exc:
        raise SandboxError(f"{what} could not start a child process: {exc.strerror or exc}") from exc
    finally:
        for fd in (read_fd, write_fd, event_read, event_write):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            _kill_group(proc)  # sweep anything the child left running; also reaps the child
    if data is not None:
        return data
    _log.debug("%s: child stderr tail: %s", what, _tail(stderr_path))
    code = proc.returncode
    if code is not None and code < 0:
        name = _signal_name(-code)
        hint = " (possibly out of memory)" if -code == signal.SIGKILL else ""
        raise SandboxCrashed(f"{what} crashed ({name}){hint}", name)
    raise SandboxError(f"{what} exited with status {code} without a result{_memory_hint(limits)}")


def _read_reply(
    fd: int, event_fd: int, proc: subprocess.Popen[bytes], deadline: float, what: str, watch: _Watch
) -> tuple[bytes | None, str | None]:
    """(the reply or None when the child gave none, None or why it stopped: "timeout" / "cancelled").

    Events are read before the reply in each round, and drained once the reply is complete: the
    child writes every event before its reply, so none is lost or delivered out of order.
    """
    buf = bytearray()
    watched = [fd] if event_fd < 0 else [fd, event_fd]
    while True:
        if watch.stop_requested():
            return None, "cancelled"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, "timeout"
        ready, _, _ = select.select(watched, [], [], min(remaining, _POLL_S))
        if event_fd in ready and not watch.read(event_fd):
            watched.remove(event_fd)  # every writer closed
        if fd in ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:  # every writer closed: the child is done (or dead)
                break
            buf += chunk
            if len(buf) >= HEADER.size:
                (size,) = HEADER.unpack_from(buf)
                if size > _MAX_REPLY_BYTES:
                    raise SandboxError(f"{what} sent back a reply larger than {_MAX_REPLY_BYTES // 2**20} MiB")
                if len(buf) >= HEADER.size + size:
                    if event_fd in watched:
                        watch.drain(event_fd)
                    return bytes(buf[HEADER.size : HEADER.size + size]), None
        elif not ready and proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            break  # the child exited; a grandchild may still hold the pipe open
    return None, None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group and reap the child (no zombie)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        proc.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(path.stat().st_size - limit, 0))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class other than the few listed is refused."""

    _ALLOWED = frozenset(
        {
            ("builtins", "complex"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("pathlib", "Path"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def _unpack(data: bytes, limits: SandboxLimits, what: str) -> Any:
    try:
        reply = _PlainUnpickler(io.BytesIO(data)).load()
        kind, *rest = reply
    except Exception as exc:  # a malformed or hostile reply
        raise SandboxError(f"{what} sent back a reply that is not plain data: {exc}") from exc
    if kind == "ok":
        return rest[0]
    if kind == "memory":
        limit = "none" if limits.memory_bytes is None else f"{limits.memory_bytes // 2**20} MiB"
        raise SandboxError(f"{what} ran out of memory (limit {limit})")
    if kind == "raise":
        module, qualname, message = (str(x) for x in rest)
        raise _optimizer_error(module, qualname)(message)
    if kind == "error":
        type_name, message = (str(x) for x in rest)
        # Under an address-space cap CPython sometimes surfaces a failed allocation as a stray
        # KeyboardInterrupt or SystemExit (no one signals the child's session): name the likely cause.
        hint = _memory_hint(limits) if type_name in ("KeyboardInterrupt", "SystemExit") else ""
        raise SandboxError(f"{what} failed: {type_name}: {redact_paths(message)}{hint}")
    raise SandboxError(f"{what} sent back an unknown reply")


def _memory_hint(limits: SandboxLimits) -> str:
    """An unexplained failure under a memory cap is often the cap: say so (never claim it)."""
    if limits.memory_bytes is None:
        return ""
    return f" (the child's memory limit was {limits.memory_bytes // 2**20} MiB; it may have run out of memory)"


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s/:'\"]+){2,}/?")


def redact_paths(text: str) -> str:
    """``text`` with file-system paths replaced by ``<path>`` (messages reach API clients)."""
    return _PATH.sub("<path>", text)


def _optimizer_error(module: str, qualname: str) -> type[OptimizerError]:
    """The OptimizerError subclass the child named, if it is one of ours; else SandboxError."""
    if module != "optimizer" and not module.startswith("optimizer."):
        return SandboxError
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return SandboxError
    if isinstance(obj, type) and issubclass(obj, OptimizerError) and obj not in (SandboxCrashed, SandboxCancelled):
        return obj
    return SandboxError
