"""The pipeline through its library API on tiny models: tasks, budgets, fallback, time budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer.errors import InvalidData
from optimizer.pipeline import OptimizeConfig, optimize
from tests import builders

FAST = {"latency_seconds": 0.1, "measure_memory": False}


def test_without_labels_accuracy_is_fidelity_to_the_original(mlp_model: Path, tmp_path: Path) -> None:
    data = builders.mlp_data(tmp_path / "unlabeled.npz", labels=False)
    report = optimize(
        mlp_model, data, tmp_path / "out", OptimizeConfig(techniques=("int8-dynamic",), fallback=False, **FAST)
    )
    assert report.baseline.accuracy.task == "fidelity"
    assert report.baseline.accuracy.value == pytest.approx(1.0)
    (candidate,) = report.candidates
    assert candidate.accuracy.metric == "cosine"
    assert 0.9 < candidate.accuracy.value < 1.0  # int8 really changed the outputs, and only a little
    assert candidate.accuracy_drop == pytest.approx(1.0 - candidate.accuracy.value, abs=1e-6)
    assert report.data.labels == "none"


def test_float_labels_are_regression(mlp_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "regression.npz"
    np.savez(data, x=rng.normal(size=(40, 16)).astype(np.float32), labels=rng.normal(size=(40, 4)).astype(np.float32))
    report = optimize(mlp_model, data, tmp_path / "out", OptimizeConfig(techniques=("graph",), **FAST))
    assert report.baseline.accuracy.metric == "mse"
    assert not report.baseline.accuracy.higher_is_better
    assert "mae" in report.baseline.accuracy.metrics


def test_duplicates_are_dropped_before_the_split(mlp_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 16)).astype(np.float32)
    data = tmp_path / "dupes.npz"
    np.savez(data, x=np.concatenate([x, x[:10]]), labels=rng.integers(0, 4, 40))
    report = optimize(mlp_model, data, tmp_path / "out", OptimizeConfig(techniques=("graph",), **FAST))
    assert report.data.samples == 40 and report.data.duplicates_dropped >= 10
    assert report.data.calibration_samples + report.data.validation_samples == 40 - report.data.duplicates_dropped


def test_a_tight_budget_triggers_the_fallback(mlp_model: Path, tmp_path: Path) -> None:
    data = builders.mlp_data(tmp_path / "unlabeled.npz", labels=False, samples=48)
    config = OptimizeConfig(
        techniques=("int8-dynamic",), max_accuracy_drop=1e-7, fallback=True, fallback_max_trials=2, **FAST
    )
    report = optimize(mlp_model, data, tmp_path / "out", config)
    names = [c.name for c in report.candidates]
    assert names == ["int8-dynamic", "int8-dynamic+fallback"]
    fallback = report.candidates[1]
    details = fallback.passes[-1]["details"]
    assert details["trials"], "the fallback recorded its trials"
    assert fallback.accuracy_drop <= report.candidates[0].accuracy_drop


def test_time_budget_skips_the_remaining_candidates(mlp_model: Path, mlp_samples: Path, tmp_path: Path) -> None:
    config = OptimizeConfig(techniques=("graph", "int8-dynamic"), time_budget_s=1e-6, **FAST)
    report = optimize(mlp_model, mlp_samples, tmp_path / "out", config)
    assert report.candidates == []
    assert {s.name for s in report.skipped} == {"graph", "int8-dynamic"}
    assert all(s.reason == "time budget exhausted" for s in report.skipped)
    assert report.chosen == "baseline"
    assert (tmp_path / "out" / "model.onnx").read_bytes() == mlp_model.read_bytes()


def test_bad_data_raises_and_leaves_no_output(mlp_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "wrong.npz"
    np.savez(data, x=np.zeros((8, 15), np.float32))
    with pytest.raises(InvalidData, match="'x'"):
        optimize(mlp_model, data, tmp_path / "out", OptimizeConfig(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "wrong.npz"]


def test_a_shared_first_step_reports_its_details_in_every_candidate(
    mlp_model: Path, mlp_samples: Path, tmp_path: Path
) -> None:
    config = OptimizeConfig(techniques=("int8-dynamic", "int8-dynamic-per-channel"), fallback=False, **FAST)
    report = optimize(mlp_model, mlp_samples, tmp_path / "out", config)
    first, second = report.candidates
    assert first.passes[0] == second.passes[0]  # the shared graph step, with its details
    assert first.passes[0]["details"]["level"] == "basic"
