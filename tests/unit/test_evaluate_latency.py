"""Latency and throughput on a real ONNX Runtime session (behaviour only, never timings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer.data import SampleData
from optimizer.errors import InvalidModel
from optimizer.evaluate.latency import fixed_batch_size, measure
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
