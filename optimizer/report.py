"""The optimization report: one pydantic schema, written as report.json and report.html.

``baseline`` and every ``candidates[]`` entry carry ``accuracy``, ``latency_ms`` (p50/p95/p99),
``throughput`` (samples/s) and ``size_bytes`` at the serving batch size; each candidate also
``name``, ``techniques``, ``accuracy_drop``, ``accepted`` and ``pareto``; ``chosen`` names the
winner (``"baseline"`` when no candidate qualified).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # inf errors stay readable


class LatencyStats(_Model):
    """Per-call latency percentiles in milliseconds."""

    p50: float
    p95: float
    p99: float
    mean: float


class BatchPerformance(_Model):
    """Latency and throughput measured at one batch size after warm-up."""

    batch_size: int
    latency_ms: LatencyStats
    throughput: float  # samples per second
    iterations: int


class AccuracyResult(_Model):
    """Accuracy on the validation split.

    ``metric`` names the primary value (``top1``, ``mse``, ``cosine``...), which is what budgets
    and drops are computed on; ``metrics`` holds every value measured (top5, mae, max relative
    error, fidelity to the original...).
    """

    task: Literal["classification", "regression", "fidelity"]
    metric: str
    value: float
    higher_is_better: bool
    metrics: dict[str, float] = Field(default_factory=dict)
    samples: int


class OpTiming(_Model):
    """One operator's share of the profiled run time."""

    node: str
    op_type: str
    total_ms: float
    calls: int
    share: float  # of all profiled node time, 0..1


class Measurement(_Model):
    """What was measured for one model (the baseline or a candidate)."""

    accuracy: AccuracyResult
    latency_ms: LatencyStats  # at the serving batch size
    throughput: float  # samples/s at the serving batch size
    size_bytes: int
    peak_memory_bytes: int | None = None
    performance: list[BatchPerformance]  # batch 1 and the serving batch size
    bottlenecks: list[OpTiming] = Field(default_factory=list)


class Candidate(Measurement):
    """One optimized model and how it compares with the baseline."""

    name: str
    techniques: list[str]
    passes: list[dict[str, Any]]  # [{"pass": name, "config": {...}}] as applied, in order
    accuracy_drop: float  # in the metric's units (or a fraction with relative budgets); >0 is worse
    # throughput over the baseline's at the serving batch size: the median of rounds timed
    # alternately with the baseline (so not exactly throughput / the baseline's throughput)
    speedup: float
    accepted: bool
    pareto: bool = False
    reason: str  # why accepted or rejected, one line
    build_seconds: float


class Skipped(_Model):
    """A candidate that was not produced, and why (not applicable, failed, out of time)."""

    name: str
    reason: str


class DataSummary(_Model):
    samples: int
    duplicates_dropped: int
    calibration_samples: int
    validation_samples: int
    labels: Literal["classification", "regression", "none"]
    seed: int


class ModelSummary(_Model):
    source_format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int


class Environment(_Model):
    cpu: str
    cores: int
    python: str
    onnxruntime: str
    onnx: str
    torch: str | None
    providers: list[str]
    device: str
    slimserve: str


class Budget(_Model):
    max_accuracy_drop: float
    relative: bool
    objective: Literal["throughput", "latency", "size"]
    serving_batch_size: int
    time_budget_s: float


class Report(_Model):
    """Everything one optimization run found."""

    schema_version: int = SCHEMA_VERSION
    created_at: str
    duration_s: float
    model: ModelSummary
    data: DataSummary
    budget: Budget
    environment: Environment
    baseline: Measurement
    candidates: list[Candidate]
    skipped: list[Skipped] = Field(default_factory=list)
    chosen: str  # a candidate's name, or "baseline"
    chosen_reason: str

    def chosen_candidate(self) -> Candidate | None:
        """The chosen candidate, or None when the original model was kept."""
        return next((c for c in self.candidates if c.name == self.chosen), None)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(report: Report, path: Path) -> None:
    """Write report.json atomically."""
    atomic_write_text(path, report.model_dump_json(indent=2))


def read_json(path: Path) -> Report:
    """Parse a report.json written by :func:`write_json`."""
    return Report.model_validate_json(path.read_text(encoding="utf-8"))
