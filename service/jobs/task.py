"""One optimization job's work, run INSIDE the sandbox child (see :mod:`service.jobs.worker`).

Plain data in (paths, the optimizer's options as JSON-ready data), plain data out (a summary of the
report): the sandbox pickles the call to the child and reads the reply with a restricted
unpickler, so nothing richer may cross. Progress goes to the parent as events
(:func:`optimizer.sandbox.emit`). No database, storage or credentials exist here: the parent
downloads the inputs, uploads the outputs and commits, checking the child's summary with
:func:`clean_summary` on the way (the child ran code on an uploaded model).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from optimizer.errors import InvalidConfig
from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.report import Measurement, Report
from optimizer.sandbox import emit

#: What :func:`run_optimization` leaves in ``out_dir``: the pipeline's outputs and the validated original.
OUTPUT_FILES = ("model.onnx", "report.json", "report.html", "original.onnx")
#: The validated original's name in ``early_dir`` (and in the ``original`` event).
EARLY_ORIGINAL = "original.onnx"

_MAX_SUMMARY_ITEMS = 64
_MAX_SUMMARY_TEXT = 1000


def run_optimization(
    model_path: str, data_path: str, out_dir: str, options: dict[str, Any], early_dir: str | None = None
) -> dict[str, Any]:
    """Validate (and convert) the original, optimize it and return a summary of the report.

    ``options`` is ``OptimizeConfig(...).model_dump(mode="json")``. Writes ``out_dir/model.onnx``,
    ``report.json``, ``report.html`` (the pipeline's outputs) and ``original.onnx`` (the validated
    original as ONNX, what version 1 serves); nothing appears in ``out_dir`` unless all succeeded.
    With ``early_dir``, the validated original is also written there as ``original.onnx`` as soon
    as it has been measured, and the event ``{"original": "original.onnx", "metric": ...,
    "accuracy": ...}`` tells the parent, which can serve it while the candidates are built.
    OptimizerError on a bad model, bad data or bad options.
    """
    try:
        config = OptimizeConfig.model_validate(options)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ())) or "options"
        raise InvalidConfig(f"invalid optimization options: {where}: {error.get('msg', 'invalid')}") from None
    emit({"stage": "validate model", "progress": 0.0})
    on_original = _early_publisher(Path(early_dir)) if early_dir is not None else None
    report = optimize(
        Path(model_path),
        Path(data_path),
        Path(out_dir),
        config,
        progress=_progress,
        keep_original=True,
        on_original=on_original,
    )
    return summarize(report)


def _early_publisher(folder: Path) -> Callable[[Path, Measurement], None]:
    """The pipeline's ``on_original``: copy the file into ``folder`` (atomically), then tell the parent."""

    def publish(original: Path, baseline: Measurement) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{EARLY_ORIGINAL}.partial"
        shutil.copyfile(original, partial)
        partial.replace(folder / EARLY_ORIGINAL)
        accuracy = baseline.accuracy.value
        figures = {"metric": baseline.accuracy.metric, "accuracy": accuracy if math.isfinite(accuracy) else None}
        emit({"original": EARLY_ORIGINAL, **figures})

    return publish


def _progress(stage: str, fraction: float) -> None:
    emit({"stage": stage, "progress": fraction})


def summarize(report: Report) -> dict[str, Any]:
    """The report's headline numbers as flat plain data (the version's ``summary``).

    ``speedup`` is the chosen candidate's throughput over the baseline's at the serving batch size
    (1.0 when the baseline was kept); non-finite numbers become None (JSON columns refuse them).
    """
    baseline = report.baseline
    chosen = report.chosen_candidate()
    after = chosen or baseline
    summary: dict[str, Any] = {
        "chosen": report.chosen,
        "chosen_reason": report.chosen_reason,
        "metric": baseline.accuracy.metric,
        "higher_is_better": baseline.accuracy.higher_is_better,
        "baseline_accuracy": baseline.accuracy.value,
        "accuracy": after.accuracy.value,
        "accuracy_drop": chosen.accuracy_drop if chosen else 0.0,
        "speedup": chosen.speedup if chosen else 1.0,
        "serving_batch_size": report.budget.serving_batch_size,
        "size_bytes_before": baseline.size_bytes,
        "size_bytes_after": after.size_bytes,
        "latency_p50_ms_before": baseline.latency_ms.p50,
        "latency_p50_ms_after": after.latency_ms.p50,
        "throughput_before": baseline.throughput,
        "throughput_after": after.throughput,
        "duration_s": report.duration_s,
        "candidates": len(report.candidates),
    }
    return {key: _finite(value) for key, value in summary.items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_summary(summary: Any) -> dict[str, Any]:
    """The parent's check of a summary the child sent: bounded flat data, finite numbers.

    The child ran code on an uploaded model, so its reply is checked like input: entries that are
    not plain scalars are dropped, long texts cut, NaN and infinities become None.
    """
    if not isinstance(summary, dict):
        return {}
    clean: dict[str, Any] = {}
    for key, value in list(summary.items())[:_MAX_SUMMARY_ITEMS]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        if isinstance(value, float):
            value = _finite(value)
        elif isinstance(value, str):
            value = value[:_MAX_SUMMARY_TEXT]
        elif value is not None and not isinstance(value, bool | int | float):
            continue
        clean[key] = value
    return clean
