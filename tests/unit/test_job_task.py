"""service.jobs.task: the job's work on a tiny real MLP, run the way the worker runs it (in a sandbox child)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from optimizer.errors import InvalidConfig, InvalidModel, UnsupportedModel
from optimizer.pipeline import OptimizeConfig
from optimizer.report import read_json
from optimizer.sandbox import run_isolated
from service.jobs.task import OUTPUT_FILES, clean_summary, run_optimization, summarize
from tests import builders

OPTIONS = OptimizeConfig(
    techniques=("int8-dynamic",), latency_seconds=0.2, fallback=False, measure_memory=False
).model_dump(mode="json")


@pytest.fixture(scope="module")
def sandboxed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One optimization of the MLP in a sandbox child, with its progress events."""
    folder = tmp_path_factory.mktemp("task")
    model = builders.mlp_onnx(folder / "upload.onnx")
    data = builders.mlp_data(folder / "data.npz")
    out = folder / "work" / "out"
    early = folder / "work" / "early"
    events: list[dict[str, Any]] = []
    summary = run_isolated(
        run_optimization,
        str(model),
        str(data),
        str(out),
        OPTIONS,
        str(early),
        description="optimization",
        on_event=events.append,
    )
    return {"model": model, "out": out, "early": early, "events": events, "summary": summary}


def test_outputs_and_the_validated_original_are_written(sandboxed_run: dict[str, Any]) -> None:
    out: Path = sandboxed_run["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    original = onnx.load(str(out / "original.onnx"))
    onnx.checker.check_model(original)
    assert [i.name for i in original.graph.input] == ["x"]
    # An ONNX upload's validated original is the upload itself, byte for byte.
    assert (out / "original.onnx").read_bytes() == sandboxed_run["model"].read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no work folders left
    assert json.loads((out / "report.json").read_text())["chosen"]
    assert (out / "report.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_progress_events_arrive_in_order_and_end_done(sandboxed_run: dict[str, Any]) -> None:
    events = [e for e in sandboxed_run["events"] if "stage" in e]
    assert events[0] == {"stage": "validate model", "progress": 0.0}
    assert events[-1] == {"stage": "done", "progress": 1.0}
    stages = [e["stage"] for e in events]
    assert "baseline" in stages and "candidate int8-dynamic" in stages
    fractions = [e["progress"] for e in events]
    assert fractions == sorted(fractions)


def test_the_original_is_announced_once_measured_before_the_candidates(sandboxed_run: dict[str, Any]) -> None:
    events = sandboxed_run["events"]
    announced = [i for i, e in enumerate(events) if "original" in e]
    assert len(announced) == 1
    stages = [e.get("stage") for e in events]
    assert stages.index("baseline") < announced[0] < stages.index("candidate int8-dynamic")
    report = read_json(sandboxed_run["out"] / "report.json")
    figures = {"original": "original.onnx", "metric": report.baseline.accuracy.metric}
    assert events[announced[0]] == {**figures, "accuracy": report.baseline.accuracy.value}
    early: Path = sandboxed_run["early"]
    assert [p.name for p in early.iterdir()] == ["original.onnx"]  # no partial file left
    assert (early / "original.onnx").read_bytes() == (sandboxed_run["out"] / "original.onnx").read_bytes()


def test_summary_matches_the_report(sandboxed_run: dict[str, Any]) -> None:
    summary = sandboxed_run["summary"]
    report = read_json(sandboxed_run["out"] / "report.json")
    assert summary == summarize(report)
    assert summary["chosen"] == report.chosen
    assert summary["candidates"] == len(report.candidates) == 1
    assert summary["metric"] == report.baseline.accuracy.metric
    assert summary["baseline_accuracy"] == report.baseline.accuracy.value
    assert summary["size_bytes_before"] == report.baseline.size_bytes
    assert summary["latency_p50_ms_before"] == report.baseline.latency_ms.p50
    chosen = report.chosen_candidate()
    if chosen is not None:
        assert summary["speedup"] == chosen.speedup
        assert summary["accuracy_drop"] == chosen.accuracy_drop
        assert summary["size_bytes_after"] == chosen.size_bytes
    for value in summary.values():
        assert value is None or isinstance(value, bool | int | float | str)


def test_summary_of_a_kept_baseline_and_non_finite_numbers(sandboxed_run: dict[str, Any]) -> None:
    report = read_json(sandboxed_run["out"] / "report.json")
    accuracy = report.baseline.accuracy.model_copy(update={"value": math.nan})
    kept = report.model_copy(
        update={"chosen": "baseline", "baseline": report.baseline.model_copy(update={"accuracy": accuracy})}
    )
    summary = summarize(kept)
    assert summary["chosen"] == "baseline"
    assert summary["speedup"] == 1.0 and summary["accuracy_drop"] == 0.0
    assert summary["size_bytes_after"] == summary["size_bytes_before"]
    assert summary["latency_p50_ms_after"] == summary["latency_p50_ms_before"]
    assert summary["baseline_accuracy"] is None and summary["accuracy"] is None
    json.dumps(summary, allow_nan=False)


def test_clean_summary_keeps_bounded_scalars_only() -> None:
    hostile: dict[Any, Any] = {
        "chosen": "int8",
        "speedup": 2.5,
        "candidates": 3,
        "kept": True,
        "none": None,
        "nan": math.nan,
        "inf": -math.inf,
        "long": "x" * 5000,
        "nested": {"a": 1},
        "list": [1, 2],
        "bytes": b"raw",
        7: "not a string key",
        "k" * 65: "key too long",
    }
    assert clean_summary(hostile) == {
        "chosen": "int8",
        "speedup": 2.5,
        "candidates": 3,
        "kept": True,
        "none": None,
        "nan": None,
        "inf": None,
        "long": "x" * 1000,
    }
    assert clean_summary(["not", "a", "dict"]) == {}
    assert len(clean_summary({f"k{i}": i for i in range(500)})) == 64


def test_an_invalid_model_fails_and_leaves_nothing(tmp_path: Path) -> None:
    model = tmp_path / "original.onnx"
    model.write_bytes(np.random.default_rng(0).bytes(4096))
    data = builders.mlp_data(tmp_path / "data.npz")
    work = tmp_path / "work"
    with pytest.raises(UnsupportedModel, match="not a recognised model format"):
        run_optimization(str(model), str(data), str(work / "out"), OPTIONS)
    assert list(work.iterdir()) == []


def test_a_truncated_onnx_model_is_an_invalid_onnx_model(tmp_path: Path) -> None:
    model = builders.mlp_onnx(tmp_path / "original.onnx")
    model.write_bytes(model.read_bytes()[:300])
    data = builders.mlp_data(tmp_path / "data.npz")
    with pytest.raises(InvalidModel, match="invalid ONNX model"):
        run_optimization(str(model), str(data), str(tmp_path / "work" / "out"), OPTIONS)


def test_bad_options_are_an_invalid_config(tmp_path: Path) -> None:
    model = builders.mlp_onnx(tmp_path / "original.onnx")
    data = builders.mlp_data(tmp_path / "data.npz")
    with pytest.raises(InvalidConfig, match="invalid optimization options: latency_seconds"):
        run_optimization(str(model), str(data), str(tmp_path / "out"), {**OPTIONS, "latency_seconds": -1})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_torchscript_upload_gives_an_onnx_original(tmp_path: Path) -> None:
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # named like the sample data's array
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    module = Mlp().eval()
    model = tmp_path / "original.pt"
    torch.jit.save(torch.jit.trace(module, torch.randn(2, 16)), str(model))
    data = builders.mlp_data(tmp_path / "data.npz")
    out = tmp_path / "work" / "out"
    summary = run_optimization(str(model), str(data), str(out), OPTIONS)
    original = onnx.load(str(out / "original.onnx"))
    onnx.checker.check_model(original)
    assert len(original.graph.input) == 1
    assert read_json(out / "report.json").model.source_format == "torchscript"
    assert summary["candidates"] == 1
