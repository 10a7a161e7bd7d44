"""Latency and throughput on a real ONNX Runtime session (behaviour only, never timings)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer.data import SampleData
from optimizer.errors import InvalidModel
from optimizer.evaluate.latency import SLICE_WARMUP, SLOW_CALL_S, fixed_batch_size, measure, measure_paired
from optimizer.runtime import RuntimeOptions, create_session


@pytest.fixture
def mlp_data() -> SampleData:
    return SampleData({"x": np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)})


def test_percentiles_are_ordered_and_throughput_matches_the_mean(mlp_model: Path, mlp_data: SampleData) -> None:
    session = create_session(mlp_model, RuntimeOptions(intra_op_threads=1))
    perf = measure(session, mlp_data, 8, min_iterations=20, max_iterations=200, max_seconds=0.2)
    lat = perf.latency_ms
    assert perf.batch_size == 8
    assert 0 < lat.p50 <= lat.p95 <= lat.p99
    assert lat.mean > 0
    assert 20 <= perf.iterations <= 200
    assert perf.throughput == pytest.approx(8 / (lat.mean / 1000.0), rel=1e-9)


def test_stops_at_min_iterations_once_time_is_up(mlp_model: Path, mlp_data: SampleData) -> None:
    perf = measure(create_session(mlp_model), mlp_data, 4, warmup=0, min_iterations=7, max_seconds=0.0)
    assert perf.iterations == 7


def test_max_iterations_caps_the_run(mlp_model: Path, mlp_data: SampleData) -> None:
    perf = measure(create_session(mlp_model), mlp_data, 4, min_iterations=3, max_iterations=15, max_seconds=1e9)
    assert perf.iterations == 15


def test_batch_larger_than_the_data_repeats_samples(mlp_model: Path, mlp_data: SampleData) -> None:
    perf = measure(create_session(mlp_model), mlp_data, 64, min_iterations=2, max_seconds=0.0)
    assert perf.batch_size == 64


def test_fixed_batch_model_is_timed_at_its_own_batch(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    session = create_session(tmp_path / "fixed.onnx")
    assert fixed_batch_size(session) == 4
    perf = measure(session, SampleData({"x": np.ones((2, 3), np.float32)}), 32, min_iterations=2, max_seconds=0.0)
    assert perf.batch_size == 4
    assert perf.throughput == pytest.approx(4 / (perf.latency_ms.mean / 1000.0), rel=1e-9)


def test_argument_checks(mlp_model: Path, mlp_data: SampleData) -> None:
    session = create_session(mlp_model)
    with pytest.raises(ValueError, match="iterations"):
        measure(session, mlp_data, 4, min_iterations=10, max_iterations=5)
    with pytest.raises(ValueError, match="batch_size"):
        measure(session, mlp_data, 0)


def test_inference_failure_is_an_invalid_model(mlp_model: Path) -> None:
    wrong = SampleData({"x": np.ones((4, 7), np.float32)})  # 7 features where the model takes 16
    with pytest.raises(InvalidModel, match="inference failed"):
        measure(create_session(mlp_model), wrong, 4)


# --------------------------------------------------------------------------------------------
# paired timing: a candidate against the baseline in alternating rounds


def _matmul_chain(path: Path, width: int, depth: int) -> Path:
    """``x[batch, 16]`` through ``depth`` MatMuls of ``width`` columns: more width, more work."""
    rng = np.random.default_rng(0)
    shapes = [(16, width)] + [(width, width)] * (depth - 1)
    weights = [
        helper.make_tensor(f"w{i}", TensorProto.FLOAT, s, rng.normal(size=s).astype(np.float32).ravel())
        for i, s in enumerate(shapes)
    ]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(depth)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info(f"h{depth}", TensorProto.FLOAT, ["batch", width])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_paired_speedup_orders_a_light_and_a_heavy_model(tmp_path: Path, mlp_data: SampleData) -> None:
    """The heavy model does about 2000x the multiply-adds of the light one: the paired speedup
    says which is faster either way round (a direction, not a timing)."""
    options = RuntimeOptions(intra_op_threads=1)
    light = create_session(_matmul_chain(tmp_path / "light.onnx", 16, 1), options)
    heavy = create_session(_matmul_chain(tmp_path / "heavy.onnx", 256, 3), options)
    perf, faster = measure_paired(light, heavy, mlp_data, 32, min_iterations=10, max_seconds=0.05)
    _, slower = measure_paired(heavy, light, mlp_data, 32, min_iterations=10, max_seconds=0.05)
    assert faster > 2.0 and slower < 0.5
    assert perf.batch_size == 32 and perf.iterations >= 10
    assert 0 < perf.latency_ms.p50 <= perf.latency_ms.p99


class _Machine:
    """A host that gets four times slower after ``calls`` inference calls (a neighbour starts):
    the fault the pairing is for. Both sessions run on it and are otherwise identical."""

    def __init__(self, calls: int) -> None:
        self.left = calls

    def session(self) -> Any:
        machine = self

        class Session:
            def get_inputs(self) -> list[Any]:
                return []

            def run(self, outputs: Any, feed: Any) -> list[np.ndarray]:
                machine.left -= 1
                time.sleep(0.002 if machine.left >= 0 else 0.008)
                return [np.zeros(1)]

        return Session()


def test_paired_speedup_is_immune_to_a_machine_that_slows_down(mlp_data: SampleData) -> None:
    per_round = 2 * (SLICE_WARMUP + 4)
    machine = _Machine(calls=3 + 3 + 2 * per_round + per_round // 2)  # warm-ups, two rounds, half of the third
    candidate, baseline = machine.session(), machine.session()
    perf, speedup = measure_paired(candidate, baseline, mlp_data, 4, min_iterations=20, max_seconds=0.0)
    assert perf.iterations == 20  # 5 rounds of 4 calls
    assert 0.8 < speedup < 1.25, speedup  # the same model: about 1.0 despite the slowdown
    # What the pairing avoids: timed one after the other, the same model looks 4x slower.
    machine = _Machine(calls=3 + 20)
    first, second = machine.session(), machine.session()
    before = measure(first, mlp_data, 4, min_iterations=20, max_iterations=20, max_seconds=0.0)
    after = measure(second, mlp_data, 4, min_iterations=20, max_iterations=20, max_seconds=0.0)
    assert after.throughput / before.throughput < 0.5


class _Counted:
    """A session whose every call takes ``seconds`` (a slow model), counting its calls."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def get_inputs(self) -> list[Any]:
        return []

    def run(self, outputs: Any, feed: Any) -> list[np.ndarray]:
        self.calls += 1
        time.sleep(self.seconds)
        return [np.zeros(1)]


def test_a_slow_model_is_paired_within_the_time_budget(mlp_data: SampleData) -> None:
    """Calls of SLOW_CALL_S or more: the rounds fit twice ``max_seconds`` (here one round, one cold
    call per slice), not the 5 rounds x (2 cold + 2 timed) calls per side that doubled a BERT job."""
    candidate, baseline = _Counted(SLOW_CALL_S), _Counted(SLOW_CALL_S)
    perf, speedup = measure_paired(candidate, baseline, mlp_data, 4, min_iterations=10, max_seconds=0.3)
    # warm-up, one cold call, then timed calls until two are made and the slice's 0.3 s has passed
    assert candidate.calls == baseline.calls == 3 + 1 + perf.iterations
    assert perf.iterations in (2, 3)
    assert 0.7 < speedup < 1.4, speedup
    fast, other = _Counted(0.001), _Counted(0.001)
    measure_paired(fast, other, mlp_data, 4, min_iterations=10, max_seconds=0.0)
    assert fast.calls == 3 + 5 * (SLICE_WARMUP + 2)  # a fast model keeps every round


def test_paired_argument_checks(mlp_model: Path, mlp_data: SampleData) -> None:
    session = create_session(mlp_model)
    with pytest.raises(ValueError, match="rounds"):
        measure_paired(session, session, mlp_data, 4, rounds=0)
    with pytest.raises(ValueError, match="batch_size"):
        measure_paired(session, session, mlp_data, 0)
