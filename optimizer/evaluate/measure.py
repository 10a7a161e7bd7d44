"""Evaluator: measures the baseline and every candidate the same way, on the same samples.

Accuracy on the validation split (against labels, or fidelity to the baseline's outputs), latency
and throughput at batch 1 and the serving batch size, size on disk, peak memory in a fresh child
process, and (for the baseline and the chosen model) the slowest operators. A candidate's speedup
is timed against the baseline in alternating rounds (:func:`latency.measure_paired`), so the
baseline's session stays open for the whole job.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from optimizer import __version__
from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.evaluate import accuracy, latency, memory, profile
from optimizer.report import AccuracyResult, Candidate, Environment, Measurement, OpTiming
from optimizer.runtime import RuntimeOptions, available_providers, create_session
from optimizer.select import acceptance


class Evaluator:
    """Measures models against one baseline; call :meth:`baseline` first.

    ``task`` and ``metric`` choose what accuracy means (see :func:`accuracy.score`); the defaults
    infer the task from the labels and use its default metric.
    """

    def __init__(
        self,
        validation: SampleData,
        runtime: RuntimeOptions,
        *,
        serving_batch_size: int = 32,
        latency_seconds: float = 2.0,
        measure_memory: bool = True,
        task: accuracy.TaskOption = "auto",
        metric: str | None = None,
    ) -> None:
        self.validation = validation
        self.task = task
        self.metric = metric
        self.runtime = runtime
        self.serving_batch_size = serving_batch_size
        self.latency_seconds = latency_seconds
        self.measure_memory = measure_memory
        self._reference: list[np.ndarray] | None = None
        self._baseline: Measurement | None = None
        self._baseline_session: ort.InferenceSession | None = None
        self._scores: dict[
            tuple[str, int, int], AccuracyResult
        ] = {}  # by model file: a fallback's winner is scored once

    def _session(self, model: ModelArtifact) -> ort.InferenceSession:
        return create_session(model.path, self.runtime)

    def _score(self, model: ModelArtifact, session: ort.InferenceSession | None = None) -> AccuracyResult:
        """Accuracy against the baseline's reference, computed once per model file.

        Keyed by path, size and modification time: passes delete rejected trial files, and a later
        file may take a freed name.
        """
        stat = model.path.stat()
        key = (str(model.path), stat.st_size, stat.st_mtime_ns)
        if key not in self._scores:
            outputs = accuracy.predict(session or self._session(model), self.validation, self.serving_batch_size)
            self._scores[key] = self._score_outputs(outputs)
        return self._scores[key]

    def _score_outputs(self, outputs: list[np.ndarray]) -> AccuracyResult:
        return accuracy.score(outputs, self.validation, self._reference, task=self.task, metric=self.metric)

    def _measure(
        self,
        model: ModelArtifact,
        session: ort.InferenceSession,
        result: AccuracyResult,
        reference: ort.InferenceSession | None = None,
    ) -> tuple[Measurement, float | None]:
        """The measurement, and with ``reference`` the paired speedup at the serving batch size."""
        fixed = latency.fixed_batch_size(session)
        if fixed is not None:
            self.serving_batch_size = fixed
        batch_sizes = sorted({fixed or 1, self.serving_batch_size})
        performance = [
            latency.measure(session, self.validation, size, max_seconds=self.latency_seconds) for size in batch_sizes
        ]
        serving = performance[-1]
        speedup = None
        if reference is not None:
            # Latency percentiles above come from an uninterrupted run, like the baseline's; the
            # speedup from rounds alternating with the baseline (switching sessions disturbs the
            # first calls of a round, which would inflate a p99 but not a round's median).
            _, speedup = latency.measure_paired(
                session, reference, self.validation, batch_sizes[-1], max_seconds=self.latency_seconds
            )
        peak = None
        if self.measure_memory:
            peak = memory.peak_memory(model.path, self.validation.batch(self.serving_batch_size), self.runtime)
        measurement = Measurement(
            accuracy=result,
            latency_ms=serving.latency_ms,
            throughput=serving.throughput,
            size_bytes=model.size_bytes,
            peak_memory_bytes=peak,
            performance=performance,
        )
        return measurement, speedup

    def baseline(self, model: ModelArtifact) -> Measurement:
        """Measure the original model; its outputs become the fidelity reference."""
        session = self._session(model)
        self._reference = accuracy.predict(session, self.validation, self.serving_batch_size)
        result = self._score_outputs(self._reference)
        measured, _ = self._measure(model, session, result)
        self._baseline = measured.model_copy(update={"bottlenecks": self.bottlenecks(model)})
        self._baseline_session = session
        return self._baseline

    def _require_baseline(self) -> Measurement:
        if self._baseline is None:
            raise RuntimeError("Evaluator.baseline() must run first")
        return self._baseline

    def drop(self, result: AccuracyResult, relative: bool) -> float:
        """Accuracy drop of ``result`` against the baseline (positive = worse)."""
        return accuracy.accuracy_drop(self._require_baseline().accuracy, result, relative=relative)

    def accuracy_drop_fn(self, relative: bool) -> Callable[[ModelArtifact], float]:
        """A function measuring only accuracy (no timing), for passes that steer by it."""

        def measure_drop(model: ModelArtifact) -> float:
            return self.drop(self._score(model), relative)

        return measure_drop

    def candidate(
        self,
        model: ModelArtifact,
        *,
        name: str,
        techniques: list[str],
        passes: list[dict[str, Any]],
        budget: float,
        relative: bool,
        build_seconds: float,
    ) -> Candidate:
        """Measure a candidate and judge it against the baseline and the budget.

        The speedup is the paired one (timed in rounds alternating with the baseline).
        """
        self._require_baseline()
        session = self._session(model)
        measured, paired = self._measure(model, session, self._score(model, session), self._baseline_session)
        speedup = paired if paired is not None else 0.0
        drop = self.drop(measured.accuracy, relative)
        accepted, reason = acceptance(drop, budget, speedup)
        return Candidate(
            **measured.model_dump(),
            name=name,
            techniques=techniques,
            passes=passes,
            accuracy_drop=drop,
            speedup=speedup,
            accepted=accepted,
            reason=reason,
            build_seconds=round(build_seconds, 3),
        )

    def bottlenecks(self, model: ModelArtifact) -> list[OpTiming]:
        """The slowest operators of ``model`` at the serving batch size."""
        feed = self.validation.batch(self.serving_batch_size)
        return profile.bottlenecks(model.path, feed, self.runtime)

    def environment(self, device: str) -> Environment:
        """Where the measurements were taken."""
        return Environment(
            cpu=_cpu_name(),
            cores=os.cpu_count() or 1,
            python=platform.python_version(),
            onnxruntime=ort.__version__,
            onnx=onnx.__version__,
            torch=_torch_version(),
            providers=available_providers(),
            device=device,
            slimserve=__version__,
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None
