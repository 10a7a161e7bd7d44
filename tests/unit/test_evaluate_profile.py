"""Per-operator profile and peak memory, on real ONNX Runtime sessions and real child processes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.evaluate.memory import peak_memory
from optimizer.evaluate.profile import aggregate, bottlenecks
from optimizer.runtime import RuntimeOptions

FEED = {"x": np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)}
UNOPTIMIZED = RuntimeOptions(graph_optimization_level="disable", intra_op_threads=1)


def _node_event(node: str, op: str, dur: int) -> dict[str, object]:
    return {"cat": "Node", "name": f"{node}_kernel_time", "dur": dur, "args": {"op_name": op}}


def test_aggregate_by_hand() -> None:
    events = [
        _node_event("a", "MatMul", 300),
        _node_event("a", "MatMul", 500),
        _node_event("b", "Relu", 200),
        {"cat": "Node", "name": "a_fence_before", "dur": 999, "args": {}},  # not kernel time
        {"cat": "Session", "name": "model_run", "dur": 5000, "args": {}},
    ]
    a, b = aggregate(events)
    assert (a.node, a.op_type, a.calls, a.total_ms, a.share) == ("a", "MatMul", 2, 0.8, 0.8)
    assert (b.node, b.op_type, b.calls, b.total_ms) == ("b", "Relu", 1, 0.2)
    assert b.share == pytest.approx(0.2)
    assert aggregate({"traceEvents": events}, top=1) == [a]
    assert aggregate([]) == []


def test_profile_finds_the_matmuls_and_removes_the_trace(
    mlp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the trace folder is created
    monkeypatch.chdir(scratch)  # where ONNX Runtime would write a trace given a relative prefix
    timings = bottlenecks(mlp_model, FEED, UNOPTIMIZED, runs=3)
    by_node = {t.node: t for t in timings}
    assert set(by_node) == {"fc1", "fc1_bias", "relu1", "fc2", "fc2_bias"}
    assert by_node["fc1"].op_type == by_node["fc2"].op_type == "MatMul"
    assert all(t.calls == 3 and t.total_ms > 0 for t in timings)
    assert [t.total_ms for t in timings] == sorted((t.total_ms for t in timings), reverse=True)
    assert sum(t.share for t in timings) == pytest.approx(1.0)  # every node is listed here
    assert list(scratch.iterdir()) == []


def test_profile_top_and_fused_nodes(mlp_model: Path) -> None:
    timings = bottlenecks(mlp_model, FEED, RuntimeOptions(intra_op_threads=1), top=1, runs=2)
    assert len(timings) == 1
    assert 0 < timings[0].share <= 1
    optimized = bottlenecks(mlp_model, FEED, RuntimeOptions(intra_op_threads=1), runs=2)
    assert sum(t.share for t in optimized) <= 1 + 1e-9
    # With graph optimization on, ONNX Runtime runs MatMul+Add fused; the fused nodes keep their origin's name.
    assert any("fc1" in t.node for t in optimized) and any("fc2" in t.node for t in optimized)


def _wide_matmul(path: Path, megabytes: int = 50) -> Path:
    columns = megabytes * 1024 * 1024 // (4 * 16)
    weight = np.random.default_rng(0).normal(size=(16, columns)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", columns])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_peak_memory_grows_with_the_model(mlp_model: Path, tmp_path: Path) -> None:
    feed = {"x": FEED["x"][:1]}
    tiny = peak_memory(mlp_model, feed, UNOPTIMIZED, runs=1)
    big = peak_memory(_wide_matmul(tmp_path / "wide.onnx"), feed, UNOPTIMIZED, runs=1)
    assert isinstance(tiny, int) and isinstance(big, int)
    assert big > 0
    assert big - tiny > 40 * 1024 * 1024  # the 50 MiB initializer is resident at least once


def test_peak_memory_is_none_when_the_child_fails(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    assert peak_memory(broken, FEED, UNOPTIMIZED) is None


def test_peak_memory_ignores_the_parents_own_memory(mlp_model: Path) -> None:
    # On Linux a spawned child's ru_maxrss starts at its parent's peak; the measurement must not.
    ballast = np.ones(256 * 1024 * 1024 // 8)  # 256 MiB, touched, resident in this process
    extra = peak_memory(mlp_model, {"x": FEED["x"][:1]}, UNOPTIMIZED, runs=1)
    assert ballast.sum() > 0
    assert extra is not None and 0 < extra < 128 * 1024 * 1024
