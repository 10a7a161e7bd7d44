"""The ``task`` and ``metric`` options: validation, scoring by the chosen metric, and the pipeline using it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from optimizer.data import SampleData
from optimizer.errors import InvalidConfig, InvalidData
from optimizer.evaluate.accuracy import (
    HIGHER_IS_BETTER,
    TASK_METRICS,
    accuracy_drop,
    infer_task,
    metric_problem,
    predict,
    resolve_metric,
    resolve_task,
    score,
)
from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.runtime import RuntimeOptions, create_session
from tests import builders

FAST = {"latency_seconds": 0.1, "measure_memory": False}
INTS = np.array([0, 1, 2, 1], np.int64)
FLOATS = np.array([0.5, 1.5, 2.0, 3.0], np.float32)


def _outputs(model: Path, data: SampleData) -> list[np.ndarray]:
    return predict(create_session(model, RuntimeOptions(device="cpu")), data, 8)


def _mlp(tmp_path: Path, classes: int, labels: np.ndarray | None, samples: int = 24) -> tuple[Path, SampleData]:
    """A real tiny MLP with ``classes`` outputs and matching random inputs."""
    model = builders.mlp_onnx(tmp_path / f"mlp{classes}.onnx", classes=classes)
    x = np.random.default_rng(3).normal(size=(samples, 16)).astype(np.float32)
    return model, SampleData({"x": x}, labels)


def _one_line(text: str) -> None:
    assert text and "\n" not in text and "Traceback" not in text


# ---- resolving the task --------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [INTS, np.array([True, False]), FLOATS, None])
def test_auto_is_exactly_the_inferred_task(labels: np.ndarray | None) -> None:
    assert resolve_task(labels, "auto") == infer_task(labels)


@pytest.mark.parametrize("labels", [INTS, FLOATS, None])
def test_forced_fidelity_fits_any_labels(labels: np.ndarray | None) -> None:
    assert resolve_task(labels, "fidelity") == "fidelity"


@pytest.mark.parametrize(
    ("labels", "task", "needle"),
    [
        (FLOATS, "classification", "needs integer class labels"),
        (INTS, "regression", "needs float target labels"),
        (None, "classification", "found none"),
        (None, "regression", "found none"),
    ],
)
def test_a_labelled_task_refuses_labels_that_do_not_fit(labels: np.ndarray | None, task: str, needle: str) -> None:
    with pytest.raises(InvalidData, match=needle) as caught:
        resolve_task(labels, task)  # type: ignore[arg-type]
    _one_line(str(caught.value))


def test_matching_labels_keep_the_forced_task() -> None:
    assert resolve_task(INTS, "classification") == "classification"
    assert resolve_task(FLOATS, "regression") == "regression"


# ---- checking the metric -------------------------------------------------------------------------


def test_every_metric_has_a_direction() -> None:
    names = {name for names in TASK_METRICS.values() for name in names}
    assert names == set(HIGHER_IS_BETTER) == {"top1", "top5", "mse", "mae", "cosine", "max_rel_error"}
    assert [name for name in sorted(names) if HIGHER_IS_BETTER[name]] == ["cosine", "top1", "top5"]


def test_defaults_are_todays_metrics() -> None:
    assert [resolve_metric(task, None) for task in ("classification", "regression", "fidelity")] == [
        "top1",
        "mse",
        "cosine",
    ]


@pytest.mark.parametrize(
    ("task", "metric", "needle"),
    [
        ("classification", "mse", "'mse' does not fit task classification; choose top1 or top5"),
        ("regression", "top1", "'top1' does not fit task regression; choose mse or mae"),
        ("fidelity", "top5", "'top5' does not fit task fidelity; choose cosine or max_rel_error"),
        ("auto", "accuracy", "'accuracy' is unknown; choose top1, top5, mse, mae, cosine or max_rel_error"),
    ],
)
def test_config_refuses_a_metric_outside_the_task(task: str, metric: str, needle: str) -> None:
    assert metric_problem(task, metric) == needle  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as caught:
        OptimizeConfig(task=task, metric=metric)
    (error,) = caught.value.errors()
    assert (error["loc"], error["msg"]) == (("metric",), needle)
    _one_line(error["msg"])


def test_config_accepts_matching_pairs_and_defaults() -> None:
    for task, names in TASK_METRICS.items():
        for name in names:
            assert metric_problem(task, name) is None and metric_problem("auto", name) is None
            assert OptimizeConfig(task=task, metric=name).metric == name
    assert OptimizeConfig().task == "auto" and OptimizeConfig().metric is None
    assert OptimizeConfig(metric="mae").task == "auto"  # checked against the labels at run time


def test_max_rel_error_refuses_a_relative_budget() -> None:
    with pytest.raises(ValidationError, match="max_rel_error cannot take a relative budget"):
        OptimizeConfig(task="fidelity", metric="max_rel_error", relative=True)


def test_auto_with_a_metric_of_another_task_is_refused_once_labels_are_known() -> None:
    with pytest.raises(InvalidConfig, match="the labels make this a classification task; choose top1 or top5"):
        resolve_metric(resolve_task(INTS, "auto"), "mse", inferred=True)


# ---- scoring by the chosen metric on real models -------------------------------------------------


def test_forced_fidelity_ignores_labels(tmp_path: Path) -> None:
    labels = np.arange(24, dtype=np.int64) % 4
    model, data = _mlp(tmp_path, 4, labels)
    outputs = _outputs(model, data)
    perturbed = [outputs[0] + np.float32(0.05)]
    result = score(perturbed, data, reference=outputs, task="fidelity")
    assert (result.task, result.metric, result.higher_is_better) == ("fidelity", "cosine", True)
    assert result.value == result.metrics["cosine"] < 1.0
    assert "top1" not in result.metrics  # the labels were not scored
    assert score(perturbed, data, reference=outputs).metric == "top1"  # auto would have used them


def test_top5_is_the_primary_metric_with_ten_classes(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 24)
    model, data = _mlp(tmp_path, 10, labels)
    outputs = _outputs(model, data)
    scores = outputs[0]
    top5 = np.argsort(-scores, axis=1)[:, :5]
    by_hand = float(np.mean([label in row for label, row in zip(labels, top5, strict=True)]))
    result = score(outputs, data, task="classification", metric="top5")
    assert (result.metric, result.higher_is_better) == ("top5", True)
    assert result.value == pytest.approx(by_hand)
    assert result.value != result.metrics["top1"]  # the primary value really is top-5
    worse = score([-scores], data, metric="top5")  # ranking reversed: worse top-5
    assert accuracy_drop(result, worse) == pytest.approx(result.value - worse.value)
    assert accuracy_drop(result, worse) > 0


def test_top5_needs_five_classes(tmp_path: Path) -> None:
    model, data = _mlp(tmp_path, 4, np.arange(24, dtype=np.int64) % 4)
    with pytest.raises(InvalidData, match="metric top5 needs at least 5 class scores per sample") as caught:
        score(_outputs(model, data), data, metric="top5")
    _one_line(str(caught.value))


@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_regression_metrics_are_lower_is_better(tmp_path: Path, metric: str) -> None:
    targets = np.random.default_rng(1).normal(size=(24, 4)).astype(np.float32)
    model, data = _mlp(tmp_path, 4, targets)
    outputs = _outputs(model, data)
    error = outputs[0].astype(np.float64) - targets
    expected = float(np.mean(error**2)) if metric == "mse" else float(np.mean(np.abs(error)))
    result = score(outputs, data, task="regression", metric=metric)
    assert (result.task, result.metric, result.higher_is_better) == ("regression", metric, False)
    assert result.value == pytest.approx(expected)
    worse = score([outputs[0] + np.float32(1.0)], data, task="regression", metric=metric)
    assert worse.value > result.value and accuracy_drop(result, worse) == pytest.approx(worse.value - result.value)


def test_max_rel_error_is_lower_is_better(tmp_path: Path) -> None:
    model, data = _mlp(tmp_path, 4, None)
    outputs = _outputs(model, data)
    base = score(outputs, data, reference=outputs, task="fidelity", metric="max_rel_error")
    assert (base.metric, base.value, base.higher_is_better) == ("max_rel_error", 0.0, False)
    off = score([outputs[0] * np.float32(1.1)], data, reference=outputs, metric="max_rel_error")
    assert off.value == pytest.approx(0.1, rel=1e-3)
    assert accuracy_drop(base, off) == pytest.approx(off.value)


# ---- the pipeline uses the chosen metric everywhere ----------------------------------------------


def test_pipeline_forced_fidelity_with_labels_present(mlp_model: Path, mlp_samples: Path, tmp_path: Path) -> None:
    config = OptimizeConfig(task="fidelity", techniques=("int8-dynamic",), fallback=False, **FAST)
    report = optimize(mlp_model, mlp_samples, tmp_path / "out", config)
    assert np.load(mlp_samples)["labels"].dtype.kind == "i"  # labels were there
    assert (report.baseline.accuracy.task, report.baseline.accuracy.metric) == ("fidelity", "cosine")
    assert report.baseline.accuracy.value == pytest.approx(1.0)
    assert "top1" not in report.baseline.accuracy.metrics
    (candidate,) = report.candidates
    assert candidate.accuracy.metric == "cosine"
    assert candidate.accuracy_drop == pytest.approx(1.0 - candidate.accuracy.value, abs=1e-9)
    assert report.data.labels == "none"  # the labels were not used


def test_pipeline_judges_by_top5(tmp_path: Path) -> None:
    model = builders.mlp_onnx(tmp_path / "mlp10.onnx", classes=10)
    x = np.random.default_rng(2).normal(size=(400, 16)).astype(np.float32)
    logits = _outputs(model, SampleData({"x": x}))[0]
    data = tmp_path / "fifth.npz"
    # Each label is the original's 5th-ranked class: top-5 is perfect and top-1 zero, and int8 noise
    # pushes some of those labels out of the top 5 while top-1 cannot get worse.
    np.savez(data, x=x, labels=np.argsort(-logits, axis=1)[:, 4])
    config = OptimizeConfig(metric="top5", techniques=("int8-dynamic",), fallback=False, max_accuracy_drop=0.0, **FAST)
    report = optimize(model, data, tmp_path / "out", config)
    base = report.baseline.accuracy
    assert (base.task, base.metric, base.value, base.metrics["top1"]) == ("classification", "top5", 1.0, 0.0)
    (candidate,) = report.candidates
    assert candidate.accuracy.metric == "top5"
    assert candidate.accuracy.metrics["top1"] == 0.0  # judged by top-1 it would lose nothing
    assert candidate.accuracy_drop == pytest.approx(1.0 - candidate.accuracy.value)
    assert candidate.accuracy_drop > 0
    assert not candidate.accepted and "exceeds the budget" in candidate.reason
    assert report.chosen == "baseline"


@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_pipeline_regression_metric(mlp_model: Path, tmp_path: Path, metric: str) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "regression.npz"
    np.savez(data, x=rng.normal(size=(40, 16)).astype(np.float32), labels=rng.normal(size=(40, 4)).astype(np.float32))
    config = OptimizeConfig(task="regression", metric=metric, techniques=("int8-dynamic",), fallback=False, **FAST)
    report = optimize(mlp_model, data, tmp_path / "out", config)
    base = report.baseline.accuracy
    assert (base.metric, base.higher_is_better, base.value) == (metric, False, base.metrics[metric])
    (candidate,) = report.candidates
    assert candidate.accuracy_drop == pytest.approx(candidate.accuracy.value - base.value)


def test_pipeline_fallback_steers_by_the_chosen_metric(mlp_model: Path, mlp_samples: Path, tmp_path: Path) -> None:
    config = OptimizeConfig(
        task="fidelity",
        metric="max_rel_error",
        techniques=("int8-dynamic",),
        max_accuracy_drop=1e-7,
        fallback_max_trials=2,
        **FAST,
    )
    report = optimize(mlp_model, mlp_samples, tmp_path / "out", config)
    assert [c.name for c in report.candidates] == ["int8-dynamic", "int8-dynamic+fallback"]
    first, fallback = report.candidates
    assert first.accuracy_drop == pytest.approx(first.accuracy.metrics["max_rel_error"])
    assert first.accuracy_drop != pytest.approx(1.0 - first.accuracy.metrics["cosine"])
    trials = fallback.passes[-1]["details"]["trials"]
    assert trials[0]["accuracy_drop"] == pytest.approx(first.accuracy_drop)  # same model, same metric
    assert fallback.accuracy.metric == "max_rel_error"


def test_pipeline_refuses_labels_that_do_not_fit_the_task(mlp_model: Path, mlp_samples: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="task regression needs float target labels"):
        optimize(mlp_model, mlp_samples, tmp_path / "out", OptimizeConfig(task="regression", **FAST))
    assert not (tmp_path / "out").exists()
