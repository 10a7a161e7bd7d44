"""`slimserve optimize` end to end on a small CNN trained on real digits data."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optimizer.cli import main
from optimizer.report import read_json
from tests import builders

FAST = ["--latency-seconds", "0.2", "--time-budget", "300"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("digits")
    return builders.trained_digits_cnn(folder / "cnn.onnx", folder / "sample.npz")


@pytest.fixture(scope="module")
def optimized(digits: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, data = digits
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(["optimize", str(model), "--data", str(data), "--out", str(out), "--quiet", *FAST])
    assert code == 0
    return out


def test_writes_model_and_both_reports(optimized: Path) -> None:
    assert sorted(p.name for p in optimized.iterdir()) == ["model.onnx", "report.html", "report.json"]
    html = (optimized / "report.html").read_text()
    assert "<svg" in html and "int8" in html


def test_report_holds_the_contract_fields(optimized: Path) -> None:
    raw = json.loads((optimized / "report.json").read_text())
    for entry in [raw["baseline"], *raw["candidates"]]:
        assert {"accuracy", "latency_ms", "throughput", "size_bytes"} <= entry.keys()
        assert {"p50", "p95", "p99"} <= entry["latency_ms"].keys()
        assert entry["peak_memory_bytes"] > 0  # measured in a child for every model
    for candidate in raw["candidates"]:
        assert {"name", "techniques", "accuracy_drop", "accepted", "pareto"} <= candidate.keys()
    names = {c["name"] for c in raw["candidates"]}
    assert raw["chosen"] in names | {"baseline"}
    assert {"int8-dynamic", "int8-static-minmax"} <= names  # quantization really produced candidates
    assert raw["environment"]["onnxruntime"] == ort.__version__


def test_chosen_model_is_the_reported_one(optimized: Path, digits: tuple[Path, Path]) -> None:
    report = read_json(optimized / "report.json")
    chosen = report.chosen_candidate()
    if chosen is None:
        assert report.chosen == "baseline"
        return
    assert chosen.accepted and chosen.accuracy_drop <= report.budget.max_accuracy_drop
    assert chosen.speedup >= 1.0  # timed against the baseline in alternating rounds (raw throughputs are not)
    assert (optimized / "model.onnx").stat().st_size == chosen.size_bytes
    # the published model really runs and agrees with the reported accuracy class of results
    _, data = digits
    arrays = np.load(data)
    session = ort.InferenceSession(str(optimized / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": arrays["x"]})[0]
    top1 = float((logits.argmax(axis=1) == arrays["labels"]).mean())
    assert top1 >= report.baseline.accuracy.value - 0.05


def test_accuracy_is_measured_not_assumed(optimized: Path) -> None:
    report = read_json(optimized / "report.json")
    assert report.baseline.accuracy.metric == "top1"
    assert 0.5 < report.baseline.accuracy.value <= 1.0  # a trained model on real digits
    assert "top5" in report.baseline.accuracy.metrics
    for candidate in report.candidates:
        assert candidate.accuracy_drop == pytest.approx(report.baseline.accuracy.value - candidate.accuracy.value)
        if any(t.startswith("int8") for t in candidate.techniques):  # int8 really changed the outputs
            assert candidate.accuracy.metrics["cosine"] < 1.0


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    "case",
    [
        "missing-model",
        "text-model",
        "pickle-model",
        "missing-input",
        "nan-data",
        "bad-option",
        "task-metric-mismatch",
        "metric-of-another-task",
        "task-without-labels",
        "task-with-wrong-labels",
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    case: str, digits: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = digits
    args: list[str] = []
    if case == "missing-model":
        model = tmp_path / "absent.onnx"
    elif case == "text-model":
        model = tmp_path / "model.onnx"
        model.write_text("this is not a model\n")
    elif case == "pickle-model":
        model = tmp_path / "model.pt"
        model.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif case == "missing-input":
        data = tmp_path / "data.npz"
        np.savez(data, y=np.zeros((4, 1, 8, 8), np.float32))
    elif case == "nan-data":
        data = tmp_path / "data.npz"
        np.savez(data, x=np.full((4, 1, 8, 8), np.nan, np.float32))
    elif case == "bad-option":
        args = ["--max-accuracy-drop", "-1"]
    elif case == "task-metric-mismatch":
        args = ["--task", "regression", "--metric", "top1"]
    elif case == "metric-of-another-task":  # auto: the integer labels make it classification
        args = ["--metric", "mse"]
    elif case == "task-without-labels":
        data = tmp_path / "data.npz"
        np.savez(data, x=np.load(digits[1])["x"])
        args = ["--task", "classification"]
    elif case == "task-with-wrong-labels":
        args = ["--task", "regression"]
    before = _leftovers(tmp_path)
    code = main(["optimize", str(model), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet", *args, *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert _leftovers(tmp_path) == before  # no out folder, no temp folder


def test_task_and_metric_flags_choose_the_primary_metric(
    digits: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = digits
    out = tmp_path / "out"
    flags = ["--task", "classification", "--metric", "top5", "--techniques", "int8-dynamic", "--no-fallback"]
    code = main(["optimize", str(model), "--data", str(data), "--out", str(out), *flags, *FAST])
    assert code == 0
    report = read_json(out / "report.json")
    base = report.baseline.accuracy
    assert (base.task, base.metric, base.value) == ("classification", "top5", base.metrics["top5"])
    (candidate,) = report.candidates
    assert candidate.accuracy_drop == pytest.approx(base.value - candidate.accuracy.value)
    header = next(line for line in capsys.readouterr().out.splitlines() if "model" in line and "drop" in line)
    assert "top5" in header and "top1" not in header


def test_forced_fidelity_ignores_the_labels(digits: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = digits
    out = tmp_path / "out"
    flags = ["--task", "fidelity", "--metric", "max_rel_error", "--techniques", "int8-dynamic", "--no-fallback"]
    assert main(["optimize", str(model), "--data", str(data), "--out", str(out), "--quiet", *flags, *FAST]) == 0
    report = read_json(out / "report.json")
    assert (report.baseline.accuracy.task, report.baseline.accuracy.metric) == ("fidelity", "max_rel_error")
    assert report.baseline.accuracy.value == 0.0 and not report.baseline.accuracy.higher_is_better
    assert "top1" not in report.baseline.accuracy.metrics
    (candidate,) = report.candidates
    assert candidate.accuracy_drop == pytest.approx(candidate.accuracy.value) and candidate.accuracy_drop > 0


def test_console_script_runs_a_torchscript_model(digits: tuple[Path, Path], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch inputs need the torch extra")
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    scripted = torch.jit.trace(module, torch.zeros(2, 1, 8, 8))
    scripted.save(str(tmp_path / "model.pt"))
    _, data = digits
    arrays = np.load(data)
    np.savez(tmp_path / "sample.npz", input=arrays["x"], labels=arrays["labels"])
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "optimizer.cli", "optimize", str(tmp_path / "model.pt"), "--data",
         str(tmp_path / "sample.npz"), "--out", str(out), "--quiet", "--techniques", "int8-dynamic", *FAST],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = read_json(out / "report.json")
    assert report.model.source_format == "torchscript"
    assert [c.name for c in report.candidates] == ["int8-dynamic"]
