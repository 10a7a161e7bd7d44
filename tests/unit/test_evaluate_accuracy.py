"""Accuracy: task inference, prediction over batches (fixed batch included), metrics, drops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer.data import SampleData
from optimizer.errors import InvalidData, InvalidModel, UnsupportedModel
from optimizer.evaluate.accuracy import accuracy_drop, fidelity, infer_task, predict, score
from optimizer.evaluate.latency import fixed_batch_size
from optimizer.report import AccuracyResult
from optimizer.runtime import create_session


def _data(count: int, labels: np.ndarray | None = None) -> SampleData:
    return SampleData({"x": np.zeros((count, 1), np.float32)}, labels)


def _result(metric: str, value: float, higher: bool) -> AccuracyResult:
    task = "classification" if higher else "regression"
    return AccuracyResult(task=task, metric=metric, value=value, higher_is_better=higher, samples=10)


def _fixed_batch_model(path: Path, batch: int = 4) -> Path:
    """y = 2x ([B, 3]) and s = sum(x, axis 1) ([B]) with a static batch of ``batch``."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [batch]),
        ],
        [
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---- task ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "task"),
    [
        (np.array([0, 1, 2], np.int64), "classification"),
        (np.array([0, 1], np.uint8), "classification"),
        (np.array([True, False]), "classification"),
        (np.array([0.5, 1.5], np.float32), "regression"),
        (None, "fidelity"),
    ],
)
def test_infer_task(labels: np.ndarray | None, task: str) -> None:
    assert infer_task(labels) == task


def test_infer_task_refuses_strings() -> None:
    with pytest.raises(InvalidData, match="labels must be"):
        infer_task(np.array(["cat", "dog"]))


# ---- classification ------------------------------------------------------------------------------


def test_top1_and_top5_by_hand() -> None:
    scores = np.array(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
            [0.5, 0.1, 0.2, 0.3, 0.4, 0.0],  # label 4: top-1 miss, second best -> top-5 hit
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: the lowest score -> misses both
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 5: hit
        ],
        np.float32,
    )
    result = score([scores], _data(4, np.array([1, 4, 0, 5])))
    assert (result.task, result.metric, result.higher_is_better, result.samples) == ("classification", "top1", True, 4)
    assert result.value == pytest.approx(0.5)
    assert result.metrics["top5"] == pytest.approx(0.75)


def test_no_top5_below_five_classes() -> None:
    result = score([np.eye(4, dtype=np.float32)], _data(4, np.array([0, 1, 2, 0])))
    assert result.value == pytest.approx(0.75)
    assert "top5" not in result.metrics


def test_binary_logits_threshold_at_zero() -> None:
    logits = np.array([-1.0, 2.0, 0.3, -0.2], np.float32)  # a 0.5 threshold would miss sample 2
    assert score([logits], _data(4, np.array([0, 1, 1, 0]))).value == pytest.approx(1.0)


def test_binary_probabilities_threshold_at_half() -> None:
    probs = np.array([[0.2], [0.7], [0.4], [0.9]], np.float32)  # a 0 threshold would call all positive
    assert score([probs], _data(4, np.array([False, True, False, True]))).value == pytest.approx(1.0)


def test_integer_output_is_taken_as_predicted_labels() -> None:
    predicted = np.array([2, 0, 3], np.int64)
    assert score([predicted], _data(3, np.array([2, 1, 3]))).value == pytest.approx(2 / 3)


def test_label_count_must_match() -> None:
    with pytest.raises(InvalidData, match="one label"):
        score([np.zeros((4, 3), np.float32)], _data(4, np.array([0, 1, 2])))


# ---- regression ----------------------------------------------------------------------------------


def test_mse_and_mae_by_hand() -> None:
    predicted = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    result = score([predicted], _data(4, np.array([1.5, 2.0, 2.0, 4.0], np.float32)))
    assert (result.task, result.metric, result.higher_is_better) == ("regression", "mse", False)
    assert result.value == pytest.approx((0.25 + 1.0) / 4)
    assert result.metrics["mae"] == pytest.approx(1.5 / 4)


def test_multi_target_regression_by_hand() -> None:
    predicted = np.array([[1.0, 0.0], [2.0, 2.0]], np.float32)
    labels = np.array([[1.0, 1.0], [0.0, 2.0]], np.float32)
    result = score([predicted], _data(2, labels))
    assert result.value == pytest.approx((0 + 1 + 4 + 0) / 4)
    assert result.metrics["mae"] == pytest.approx((0 + 1 + 2 + 0) / 4)


def test_regression_needs_one_output_value_per_label() -> None:
    with pytest.raises(InvalidData, match="regression"):
        score([np.zeros((4, 2), np.float32)], _data(4, np.zeros(4, np.float32)))


# ---- fidelity ------------------------------------------------------------------------------------


def test_cosine_and_max_relative_error_by_hand() -> None:
    # Per sample, outputs concatenated: [1,0|0] vs [1,0|0] -> 1; [0,1|0] vs [1,0|0] -> 0;
    # zeros vs zeros -> 1; [1,1|0] vs [2,2|0] -> 1. Max |diff| 1 over max |ref| 2.
    got = [np.array([[1, 0], [0, 1], [0, 0], [1, 1]], np.float32), np.zeros((4, 1), np.float32)]
    ref = [np.array([[1, 0], [1, 0], [0, 0], [2, 2]], np.float32), np.zeros((4, 1), np.float32)]
    result = score(got, _data(4), reference=ref)
    assert (result.task, result.metric, result.higher_is_better) == ("fidelity", "cosine", True)
    assert result.value == pytest.approx(0.75)
    assert result.metrics["max_rel_error"] == pytest.approx(0.5)


def test_baseline_against_itself_is_perfect() -> None:
    outputs = [np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)]
    result = score(outputs, _data(8), reference=outputs)
    assert result.value == pytest.approx(1.0)
    assert result.metrics["max_rel_error"] == 0.0


def test_zero_against_nonzero_and_non_finite_values() -> None:
    zero = fidelity([np.zeros((1, 2), np.float32)], [np.ones((1, 2), np.float32)])
    assert zero["cosine"] == 0.0 and zero["max_rel_error"] == pytest.approx(1.0)
    nan = fidelity([np.array([[np.nan, 1.0], [1.0, 1.0]])], [np.ones((2, 2))])
    assert nan["cosine"] == pytest.approx(0.5) and nan["max_rel_error"] == float("inf")
    same_inf = fidelity([np.array([[np.inf, 1.0]])], [np.array([[np.inf, 1.0]])])
    assert same_inf == {"cosine": 1.0, "max_rel_error": 0.0}


def test_labels_and_reference_report_both() -> None:
    scores = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    result = score([scores], _data(2, np.array([1, 1])), reference=[scores * 2])
    assert result.metric == "top1" and result.value == pytest.approx(0.5)
    assert result.metrics["cosine"] == pytest.approx(1.0)
    assert result.metrics["max_rel_error"] == pytest.approx(0.5)


def test_fidelity_needs_a_reference_with_matching_outputs() -> None:
    outputs = [np.ones((2, 3), np.float32)]
    with pytest.raises(ValueError, match="reference"):
        score(outputs, _data(2))
    with pytest.raises(InvalidModel, match="outputs"):
        score(outputs, _data(2), reference=[*outputs, *outputs])
    with pytest.raises(InvalidModel, match="shapes differ"):
        score(outputs, _data(2), reference=[np.ones((2, 4), np.float32)])


# ---- drops ---------------------------------------------------------------------------------------


def test_drop_sign_conventions() -> None:
    top1 = _result("top1", 0.9, higher=True)
    assert accuracy_drop(top1, _result("top1", 0.85, True)) == pytest.approx(0.05)  # worse: positive
    assert accuracy_drop(top1, _result("top1", 0.92, True)) == pytest.approx(-0.02)  # better: negative
    mse = _result("mse", 0.5, higher=False)
    assert accuracy_drop(mse, _result("mse", 0.6, False)) == pytest.approx(0.1)
    assert accuracy_drop(mse, _result("mse", 0.4, False)) == pytest.approx(-0.1)
    assert accuracy_drop(top1, _result("top1", 0.81, True), relative=True) == pytest.approx(0.1)
    assert accuracy_drop(mse, _result("mse", 0.6, False), relative=True) == pytest.approx(0.2)


def test_relative_drop_against_a_zero_baseline() -> None:
    perfect = _result("mse", 0.0, higher=False)
    assert accuracy_drop(perfect, _result("mse", 0.0, False), relative=True) == 0.0
    assert accuracy_drop(perfect, _result("mse", 1e-3, False), relative=True) > 1e6


def test_drop_refuses_different_metrics() -> None:
    with pytest.raises(ValueError, match="compare"):
        accuracy_drop(_result("top1", 0.9, True), _result("mse", 0.1, False))


# ---- predict on real sessions ----------------------------------------------------------------------


def test_predict_pads_and_trims_a_fixed_batch(tmp_path: Path) -> None:
    session = create_session(_fixed_batch_model(tmp_path / "fixed.onnx"))
    assert fixed_batch_size(session) == 4
    x = np.arange(30, dtype=np.float32).reshape(10, 3)  # 4 + 4 + 2 (padded to 4, trimmed)
    y, s = predict(session, SampleData({"x": x}), batch_size=3)  # batch 3 cannot run: the model's 4 is used
    np.testing.assert_array_equal(y, x * 2)
    np.testing.assert_array_equal(s, x.sum(axis=1))


def test_predict_concatenates_dynamic_batches(mlp_model: Path) -> None:
    session = create_session(mlp_model)
    assert fixed_batch_size(session) is None
    x = np.random.default_rng(3).normal(size=(13, 16)).astype(np.float32)
    (logits,) = predict(session, SampleData({"x": x}), batch_size=5)
    np.testing.assert_allclose(logits, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_predict_and_score_end_to_end(mlp_model: Path) -> None:
    session = create_session(mlp_model)
    x = np.random.default_rng(4).normal(size=(20, 16)).astype(np.float32)
    labels = np.argmax(session.run(None, {"x": x})[0], axis=1)
    labels[:5] = (labels[:5] + 1) % 4  # exactly five wrong
    data = SampleData({"x": x}, labels)
    assert score(predict(session, data, 8), data).value == pytest.approx(0.75)


def test_predict_refuses_outputs_without_a_sample_axis(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)],
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "scalar.onnx"))
    session = create_session(tmp_path / "scalar.onnx")
    with pytest.raises(UnsupportedModel, match="per-sample"):
        predict(session, SampleData({"x": np.ones((4, 3), np.float32)}), 2)


def test_predict_refuses_empty_data(mlp_model: Path) -> None:
    with pytest.raises(InvalidData, match="no samples"):
        predict(create_session(mlp_model), SampleData({"x": np.zeros((0, 16), np.float32)}), 4)
