"""optimizer.sandbox events and cancellation: real child processes, real pipes, real signals.

The functions run in the child are top-level here so the child can import them by reference.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from optimizer import _sandbox_child
from optimizer._sandbox_child import MAX_EVENT_BYTES, EventLines
from optimizer.errors import SandboxError
from optimizer.sandbox import SandboxCancelled, SandboxLimits, emit, run_isolated

# ---- functions run in the child ------------------------------------------------------------


def emit_numbers(count: int) -> str:
    for i in range(count):
        emit({"stage": f"step {i}", "progress": i / count})
    return "done"


def emit_garbage() -> str:
    fd = _sandbox_child._event_fd
    assert fd is not None
    for raw in (
        b"not json\n",
        b"[1, 2, 3]\n",  # JSON, but not an object
        b'{"a": NaN}\n',
        b"\xff\xfe{}\n",  # not UTF-8
        b"[" * 3000 + b"\n",  # nested past the recursion limit
        b'{"pad": "' + b"x" * (2 * MAX_EVENT_BYTES) + b'"}\n',  # too long
        b'{"ok": 1}\n',
        b'{"ok":',  # one event split over two writes
        b" 2}\n",
    ):
        os.write(fd, raw)
    emit({"too_long": "y" * MAX_EVENT_BYTES})  # dropped by emit itself
    emit({"not_json": object()})  # dropped, no exception
    emit({"ok": 3})
    return "done"


def emit_without_listener() -> str:
    emit({"nobody": "listens"})
    return "quiet"


def sleep_with_grandchild(pid_file: str) -> None:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid}")
    emit({"stage": "sleeping"})
    time.sleep(600)


def address_space_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_AS)[1]


def nested_sandbox() -> dict[str, Any]:
    """Start a sandbox with the default (larger) limit inside this one; forward its events."""
    inner = run_isolated(emit_then_limit, on_event=emit)
    return {"outer": address_space_limit(), "inner": inner}


def emit_then_limit() -> int:
    emit({"from": "inner"})
    return address_space_limit()


def raise_cancelled() -> None:
    raise SandboxCancelled("a child cannot claim it was cancelled")


# ---- helpers --------------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The process state letter from /proc (None when the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _gone(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (its new parent may not have reaped it yet)."""
    for _ in range(100):
        if _state(pid) in (None, "Z"):
            return True
        time.sleep(0.05)
    return False


# ---- tests ----------------------------------------------------------------------------------


def test_events_arrive_in_order_before_the_result() -> None:
    events: list[dict[str, Any]] = []
    result = run_isolated(emit_numbers, 200, on_event=events.append)
    assert result == "done"
    assert events == [{"stage": f"step {i}", "progress": i / 200} for i in range(200)]


def test_garbage_lines_are_dropped_and_good_ones_still_arrive() -> None:
    events: list[dict[str, Any]] = []
    assert run_isolated(emit_garbage, on_event=events.append) == "done"
    assert events == [{"ok": 1}, {"ok": 2}, {"ok": 3}]


def test_emit_is_a_no_op_without_a_listener() -> None:
    emit({"in": "the parent"})  # outside a sandbox: nothing to send to, no error
    assert run_isolated(emit_without_listener) == "quiet"


def test_event_decoder_handles_any_chunking() -> None:
    stream = b'{"a": 1}\n' + b"z" * (MAX_EVENT_BYTES + 10) + b'\n{"b": [2]}\n{"c"'
    for size in (1, 7, 4096, len(stream)):
        decoder = EventLines()
        events: list[dict[str, Any]] = []
        for i in range(0, len(stream), size):
            events += decoder.feed(stream[i : i + size])
        assert events == [{"a": 1}, {"b": [2]}], size
        assert decoder.feed(b": 3}\n") == [{"c": 3}]


def test_a_line_just_under_the_limit_arrives_and_one_at_it_is_dropped() -> None:
    def line(total: int) -> bytes:
        body = b'{"p": "' + b"x" * (total - 10) + b'"}'
        return body + b"\n"

    assert len(line(MAX_EVENT_BYTES)) == MAX_EVENT_BYTES
    assert EventLines().feed(line(MAX_EVENT_BYTES)) != []
    assert EventLines().feed(line(MAX_EVENT_BYTES + 1)) == []


def test_should_stop_kills_the_process_group_and_raises_cancelled(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    events: list[dict[str, Any]] = []
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return bool(events)  # stop once the child said it sleeps

    # The time limit is far away: only the cancellation can end this call with SandboxCancelled.
    with pytest.raises(SandboxCancelled, match=r"^optimization was cancelled$"):
        run_isolated(
            sleep_with_grandchild,
            str(pid_file),
            limits=SandboxLimits(timeout_s=240),
            description="optimization",
            on_event=events.append,
            should_stop=should_stop,
        )
    assert polls >= 1
    child, grandchild = (int(p) for p in pid_file.read_text().split())
    assert _state(child) is None  # killed and reaped by us
    assert _gone(grandchild)  # killed with the group
    assert events == [{"stage": "sleeping"}]
    assert isinstance(SandboxCancelled("x"), SandboxError)


def test_should_stop_works_without_on_event(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    with pytest.raises(SandboxCancelled):
        run_isolated(
            sleep_with_grandchild, str(pid_file), limits=SandboxLimits(timeout_s=240), should_stop=pid_file.exists
        )
    child, grandchild = (int(p) for p in pid_file.read_text().split())
    assert _state(child) is None and _gone(grandchild)


def test_an_exception_in_on_event_kills_the_child_and_propagates(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"

    def boom(event: dict[str, Any]) -> None:
        raise RuntimeError(f"listener failed on {event}")

    with pytest.raises(RuntimeError, match="listener failed"):
        run_isolated(sleep_with_grandchild, str(pid_file), limits=SandboxLimits(timeout_s=240), on_event=boom)
    child, grandchild = (int(p) for p in pid_file.read_text().split())
    assert _state(child) is None and _gone(grandchild)


def test_a_child_cannot_fake_a_cancellation() -> None:
    with pytest.raises(SandboxError) as info:
        run_isolated(raise_cancelled)
    assert type(info.value) is SandboxError


def test_nested_sandbox_with_a_smaller_outer_limit_clamps_the_inner_one() -> None:
    outer_limit = 2 * 1024**3
    default_inner = SandboxLimits().memory_bytes
    assert default_inner is not None and default_inner > outer_limit
    events: list[dict[str, Any]] = []
    result = run_isolated(nested_sandbox, limits=SandboxLimits(memory_bytes=outer_limit), on_event=events.append)
    assert result == {"outer": outer_limit, "inner": outer_limit}  # never raised past the outer limit
    assert events == [{"from": "inner"}]


def test_clamp_never_raises_a_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    assert _sandbox_child.clamp_to_hard_limit(1024**2) == 1024**2
    if hard != resource.RLIM_INFINITY:
        assert _sandbox_child.clamp_to_hard_limit(hard + 1) == hard
