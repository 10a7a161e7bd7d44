"""optimizer.sandbox: real child processes, real signals, real limits.

The functions run in the child are top-level here so the child can import them by reference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from optimizer.errors import InvalidData, SandboxError
from optimizer.sandbox import SandboxCrashed, SandboxLimits, run_isolated

# ---- functions run in the child ------------------------------------------------------------


def add(a: int, b: int, *, scale: int = 1) -> dict[str, Any]:
    return {"sum": (a + b) * scale, "pid": os.getpid(), "path": Path("/x/y")}


def environment() -> dict[str, Any]:
    with open("/proc/self/environ", "rb") as fh:
        initial = fh.read()
    home = os.environ.get("HOME", "")
    return {"env": dict(os.environ), "initial": initial, "home_is_dir": os.path.isdir(home)}


def raise_invalid_data() -> None:
    raise InvalidData("array 'x' has 3 dims, expected 2")


def raise_value_error() -> None:
    raise ValueError("first line\nsecond line")


def allocate_a_lot() -> int:
    return len(bytearray(4 * 1024**3))


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def exit_without_result() -> None:
    os._exit(3)


def sleep_with_grandchild(pid_file: str) -> None:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid}")
    time.sleep(600)


class Hostile:
    """Unpickling this would create ``path``: the parent must refuse it as a reply."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def return_hostile(path: str) -> Hostile:
    return Hostile(path)


# ---- helpers --------------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The process state letter from /proc (None when the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


# ---- tests ----------------------------------------------------------------------------------


def test_result_and_arguments_come_back() -> None:
    result = run_isolated(add, 2, 3, scale=10)
    assert result["sum"] == 50
    assert result["pid"] != os.getpid()  # really another process
    assert result["path"] == Path("/x/y")


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSERVE_SECRET", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "AKIA-secret")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    result = run_isolated(environment, limits=SandboxLimits(cpu_threads=2))
    env = result["env"]
    assert "SLIMSERVE_SECRET" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert b"hunter2" not in result["initial"] and b"AKIA-secret" not in result["initial"]
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # OpenMP waits without spinning on shared cores
    assert env["HOME"] == env["TMPDIR"] and result["home_is_dir"]
    assert env["HOME"] != os.environ.get("HOME")
    assert not Path(env["HOME"]).exists()  # the private folder is removed afterwards
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "TZ", "LD_LIBRARY_PATH"} | {
        k
        for k in env
        if k.endswith("_THREADS") or k in ("CUDA_VISIBLE_DEVICES", "OMP_WAIT_POLICY") or k.startswith("LC_")
    }


def test_an_operators_openmp_wait_policy_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert run_isolated(environment)["env"]["OMP_WAIT_POLICY"] == "ACTIVE"


def test_optimizer_error_is_raised_again_with_class_and_message() -> None:
    with pytest.raises(InvalidData) as info:
        run_isolated(raise_invalid_data)
    assert type(info.value) is InvalidData
    assert str(info.value) == "array 'x' has 3 dims, expected 2"


def test_other_exception_becomes_one_line_sandbox_error() -> None:
    with pytest.raises(SandboxError) as info:
        run_isolated(raise_value_error)
    assert type(info.value) is SandboxError
    assert str(info.value) == "sandboxed raise_value_error failed: ValueError: first line"


def test_memory_limit_gives_memory_error() -> None:
    with pytest.raises(SandboxError, match=r"ran out of memory \(limit 512 MiB\)"):
        run_isolated(allocate_a_lot, limits=SandboxLimits(memory_bytes=512 * 1024**2))


def test_segfault_is_reported_by_signal_name() -> None:
    with pytest.raises(SandboxCrashed) as info:
        run_isolated(segfault, description="validating the model")
    assert str(info.value) == "validating the model crashed (SIGSEGV)"
    assert info.value.signal_name == "SIGSEGV"


def test_exit_without_result_is_an_error() -> None:
    with pytest.raises(SandboxError, match="exited with status 3 without a result"):
        run_isolated(exit_without_result)


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    with pytest.raises(SandboxError, match=r"timed out after 3 s"):
        run_isolated(sleep_with_grandchild, str(pid_file), limits=SandboxLimits(timeout_s=3))
    child, grandchild = (int(p) for p in pid_file.read_text().split())
    assert _state(child) is None  # killed and reaped by us: no zombie
    # The grandchild was killed with the group; its new parent reaps it, so allow it to be a zombie.
    for _ in range(100):
        if _state(grandchild) in (None, "Z"):
            break
        time.sleep(0.05)
    assert _state(grandchild) in (None, "Z")


def test_hostile_reply_is_not_unpickled_in_the_parent(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    with pytest.raises(SandboxError, match="not plain data"):
        run_isolated(return_hostile, str(canary))
    assert not canary.exists()


def test_unpicklable_function_is_refused() -> None:
    with pytest.raises(SandboxError, match="cannot be sent to a child process"):
        run_isolated(lambda: 1)


def niceness() -> dict[str, int]:
    """The child's nice value, and a thread's it starts (threads inherit it)."""
    import threading

    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(os.nice(0)))
    thread.start()
    thread.join()
    return {"main": os.nice(0), "thread": seen[0]}


def test_nice_lowers_the_childs_priority_only() -> None:
    """A background optimization yields the CPU to serving: the child (and its threads) run at the
    asked nice value on top of the parent's, and the parent's own priority is unchanged."""
    parent = os.nice(0)
    assert run_isolated(niceness, limits=SandboxLimits(nice=7)) == {"main": parent + 7, "thread": parent + 7}
    assert run_isolated(niceness) == {"main": parent, "thread": parent}
    assert os.nice(0) == parent


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError):
        SandboxLimits(memory_bytes=-1)
    with pytest.raises(ValueError):
        SandboxLimits(nice=20)


def optimizer_package_file() -> str:
    import optimizer

    return str(optimizer.__file__)


def test_onnxruntime_transformers_path_does_not_shadow_our_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing onnxruntime.transformers appends its folder (with an optimizer.py) to sys.path."""
    import onnxruntime.transformers.optimizer

    ort_folder = os.path.dirname(onnxruntime.transformers.optimizer.__file__)
    monkeypatch.setattr(sys, "path", [ort_folder, *sys.path])  # the worst case: first on the path
    assert run_isolated(optimizer_package_file).endswith(os.path.join("optimizer", "__init__.py"))
