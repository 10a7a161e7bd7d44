"""The optimization pipeline: baseline -> candidates -> evaluate -> select under the budget.

``optimize(model, data, out_dir, config)`` loads and validates the model (PyTorch files are
converted in a sandboxed child), prepares the sample data once (dedupe + a seeded split, so every
candidate is measured on the same samples), measures the original, builds each candidate recipe
within the time budget, measures every candidate the same way, adds accuracy-aware fallback
variants for quantized candidates that missed the budget, marks the Pareto front, chooses by the
objective and writes ``model.onnx``, ``report.json`` and ``report.html`` into ``out_dir``.
Nothing appears in ``out_dir`` unless the whole run succeeded.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from optimizer import data as sample_data
from optimizer import datasplit, io, recipes, select
from optimizer.artifact import ModelArtifact
from optimizer.errors import OptimizerError, PassFailed
from optimizer.evaluate import accuracy
from optimizer.evaluate.measure import Evaluator
from optimizer.passes import registry
from optimizer.passes.base import PassContext
from optimizer.report import Budget, Candidate, DataSummary, Measurement, ModelSummary, Report, Skipped, write_json
from optimizer.report_html import write_html
from optimizer.runtime import Device, RuntimeOptions, cpu_has_vnni, resolve_device

ProgressFn = Callable[[str, float], None]
#: Called once the original is validated and measured: its ONNX file (valid during the call only)
#: and the baseline measurement.
OriginalFn = Callable[[Path, Measurement], None]


class OptimizeConfig(BaseModel):
    """Every option of one optimization run (the CLI flags and the service's job config map here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_accuracy_drop: float = Field(default=0.01, ge=0)
    relative: bool = False  # the drop is a fraction of the baseline's metric instead of absolute units
    task: accuracy.TaskOption = "auto"  # auto: from the labels (integers classify, floats regress, none: fidelity)
    metric: str | None = None  # the primary metric (budget, drop, report); None = the task's default
    objective: Literal["throughput", "latency", "size"] = "throughput"
    device: Device = "auto"
    time_budget_s: float = Field(default=900.0, gt=0)
    serving_batch_size: int = Field(default=32, ge=1, le=4096)
    techniques: tuple[str, ...] | None = None  # recipe names; None = every default recipe
    finetune_search: Literal["none", "grid", "random"] = "none"  # lr / batch-size search in fine-tuning steps
    fallback: bool = True
    fallback_max_trials: int = Field(default=6, ge=1, le=50)
    seed: int = 0
    calibration_fraction: float = Field(default=0.3, gt=0, lt=1)
    intra_op_threads: int = Field(default=0, ge=0)
    latency_seconds: float = Field(default=2.0, gt=0, le=120)  # timing per batch size per model
    measure_memory: bool = True

    @field_validator("metric")
    @classmethod
    def _metric_fits_task(cls, metric: str | None, info: ValidationInfo) -> str | None:
        """The metric must be one of the task's (any task's for auto); one line otherwise."""
        task = info.data.get("task", "auto")  # absent when the task itself was invalid
        problem = accuracy.metric_problem(task, metric)
        if problem is None and metric == "max_rel_error" and info.data.get("relative"):
            # The original's max_rel_error is 0 by construction: any relative drop would be infinite.
            problem = "max_rel_error cannot take a relative budget (the original's is always 0)"
        if problem is not None:
            raise PydanticCustomError("metric_mismatch", "{problem}", {"problem": problem})
        return metric


def optimize(
    model_path: Path,
    data_path: Path,
    out_dir: Path,
    config: OptimizeConfig | None = None,
    progress: ProgressFn | None = None,
    *,
    keep_original: bool = False,
    on_original: OriginalFn | None = None,
) -> Report:
    """Run the whole optimization and write the outputs; OptimizerError on bad input.

    ``keep_original`` also publishes the validated original, converted to ONNX, as
    ``out_dir/original.onnx`` (what the service serves as version 1). ``on_original`` hears about
    that file as soon as the original has run on the whole validation split (the baseline), long
    before the candidates are done; an exception it raises fails the run.
    """
    config = config or OptimizeConfig()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".slimserve-", dir=out_dir.parent))
    try:
        report, chosen_path = _Run(config, work, progress or (lambda _stage, _fraction: None), on_original).execute(
            Path(model_path), Path(data_path)
        )
        original = work / "original" / "model.onnx" if keep_original else None
        _publish(work, out_dir, chosen_path, report, original)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(work: Path, out_dir: Path, chosen: Path, report: Report, original: Path | None = None) -> None:
    """Stage every output in the work folder, then rename each into ``out_dir``."""
    staged = work / "publish"
    staged.mkdir()
    shutil.copyfile(chosen, staged / "model.onnx")
    write_json(report, staged / "report.json")
    write_html(report, staged / "report.html")
    names = ["model.onnx", "report.json", "report.html"]
    if original is not None:  # one file: uploads are single files, so no external data follows it
        shutil.copyfile(original, staged / "original.onnx")
        names.append("original.onnx")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        tmp = out_dir / f".{name}.partial"
        shutil.move(str(staged / name), tmp)
        tmp.replace(out_dir / name)


class _Run:
    """State of one optimization run (kept out of the public API)."""

    def __init__(
        self, config: OptimizeConfig, work: Path, progress: ProgressFn, on_original: OriginalFn | None = None
    ) -> None:
        self.config = config
        self.work = work
        self.progress = progress
        self.on_original = on_original
        self.started = time.monotonic()
        self.device = resolve_device(config.device)
        self.runtime = RuntimeOptions(device=self.device, intra_op_threads=config.intra_op_threads)
        self.skipped: list[Skipped] = []
        # Outputs by step-chain key (shared prefixes run once) and by recipe name (the candidates).
        self.built: dict[str, ModelArtifact] = {}
        self.step_details: dict[str, dict[str, Any]] = {}  # what each built step reported
        self.failed: dict[str, str] = {}  # step-chain key -> why it failed

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def execute(self, model_path: Path, data_path: Path) -> tuple[Report, Path]:
        self.progress("load model", 0.0)
        fmt = io.sniff_format(model_path)
        example = None
        if fmt != "onnx":  # a PyTorch program needs example inputs to be traced into ONNX
            example = sample_data.load_npz(data_path).head(2)
        original = io.load_model(model_path, self.work / "original", example=example)

        self.progress("prepare data", 0.05)
        split = datasplit.prepare(
            data_path, original, seed=self.config.seed, calibration_fraction=self.config.calibration_fraction
        )
        task = accuracy.resolve_task(split.validation.labels, self.config.task)
        metric = accuracy.resolve_metric(task, self.config.metric, inferred=self.config.task == "auto")
        self.evaluator = Evaluator(
            split.validation,
            self.runtime,
            serving_batch_size=self.config.serving_batch_size,
            latency_seconds=self.config.latency_seconds,
            measure_memory=self.config.measure_memory,
            task=task,
            metric=metric,
        )

        self.progress("baseline", 0.1)
        baseline = self.evaluator.baseline(original)
        if self.on_original is not None:
            self.on_original(original.path, baseline)

        candidates = self._candidates(original, split.calibration)

        self.progress("select", 0.92)
        flags = select.pareto_flags(baseline, candidates)
        candidates = [c.model_copy(update={"pareto": flag}) for c, flag in zip(candidates, flags, strict=True)]
        chosen = select.choose(candidates, self.config.objective)
        if chosen is not None:
            chosen_artifact = self.built[chosen.name]
            bottlenecks = self.evaluator.bottlenecks(chosen_artifact)
            candidates = [
                c.model_copy(update={"bottlenecks": bottlenecks}) if c.name == chosen.name else c for c in candidates
            ]
        report = Report(
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            duration_s=round(self.elapsed(), 3),
            model=ModelSummary(
                source_format=original.source_format,
                inputs=[spec.model_dump() for spec in original.inputs],
                outputs=[spec.model_dump() for spec in original.outputs],
                opset=original.opset,
            ),
            data=DataSummary(
                samples=split.total_samples,
                duplicates_dropped=split.duplicates_dropped,
                calibration_samples=len(split.calibration),
                validation_samples=len(split.validation),
                labels=_label_kind(baseline.accuracy.task),
                seed=split.seed,
            ),
            budget=Budget(
                max_accuracy_drop=self.config.max_accuracy_drop,
                relative=self.config.relative,
                objective=self.config.objective,
                serving_batch_size=self.evaluator.serving_batch_size,
                time_budget_s=self.config.time_budget_s,
            ),
            environment=self.evaluator.environment(self.device),
            baseline=baseline,
            candidates=candidates,
            skipped=self.skipped,
            chosen=chosen.name if chosen else "baseline",
            chosen_reason=select.chosen_reason(chosen, self.config.objective, candidates),
        )
        self.progress("done", 1.0)
        return report, (self.built[chosen.name].path if chosen else original.path)

    def _candidates(self, original: ModelArtifact, calibration: sample_data.SampleData) -> list[Candidate]:
        plan = recipes.select_recipes(
            self.device, self.config.techniques, vnni=cpu_has_vnni(), finetune_search=self.config.finetune_search
        )
        measured: list[Candidate] = []
        retry: list[recipes.Recipe] = []
        context = PassContext(
            work_dir=self.work / "candidates",
            calibration=calibration,
            device=self.device,
            runtime=self.runtime,
            seed=self.config.seed,
            accuracy_drop=self.evaluator.accuracy_drop_fn(self.config.relative),
            budget=self.config.max_accuracy_drop,
            original=original,
            deadline=self.started + self.config.time_budget_s,
        )
        queue = list(plan)
        total = len(plan)
        while queue:
            recipe = queue.pop(0)
            done = len(measured) + len(self.skipped)
            self.progress(f"candidate {recipe.name}", 0.2 + 0.7 * min(done / max(total, 1), 1.0))
            if self.elapsed() > self.config.time_budget_s:
                self.skipped.append(Skipped(name=recipe.name, reason="time budget exhausted"))
                continue
            candidate = self._build_and_measure(recipe, original, context)
            if candidate is None:
                continue
            measured.append(candidate)
            misses_accuracy = candidate.accuracy_drop > self.config.max_accuracy_drop
            if recipe.quantized and misses_accuracy and self.config.fallback:
                retry.append(recipes.fallback_for(recipe, self.config.fallback_max_trials))
            if not queue and retry:
                # Fallbacks for the fastest quantized candidates first: those are worth rescuing.
                speed = {c.name: c.speedup for c in measured}
                retry.sort(key=lambda r: -speed.get(r.name.removesuffix("+fallback"), 0.0))
                queue, retry = retry[:2], []
                total += len(queue)
                self.skipped.extend(
                    Skipped(name=r.name, reason="fallback tried only for the two fastest quantized candidates")
                    for r in retry
                )
        return measured

    def _build_and_measure(
        self, recipe: recipes.Recipe, original: ModelArtifact, context: PassContext
    ) -> Candidate | None:
        started = time.monotonic()
        artifact = original
        applied: list[dict[str, object]] = []
        techniques: list[str] = []
        try:
            for index, (name, options) in enumerate(recipe.steps):
                step = registry.build(name, options)
                reason = step.skip_reason(artifact, context)
                if reason:
                    self.skipped.append(Skipped(name=recipe.name, reason=reason))
                    return None
                key = _chain_key(recipe.steps[: index + 1])
                if key in self.failed:  # a shared prefix that already failed: not tried twice
                    self.skipped.append(Skipped(name=recipe.name, reason=self.failed[key]))
                    return None
                if key not in self.built:
                    context.details = {}
                    try:
                        self.built[key] = step.run(artifact, context)
                    except OptimizerError as exc:
                        self.failed[key] = str(exc) if isinstance(exc, PassFailed) else f"{name}: {exc}"
                        raise
                    self.step_details[key] = dict(context.details)
                artifact = self.built[key]
                applied.append({**registry.describe(step), "details": self.step_details[key]})
                techniques.append(step.technique)
        except OptimizerError as exc:
            message = str(exc) if isinstance(exc, PassFailed) else f"{recipe.name}: {exc}"
            self.skipped.append(Skipped(name=recipe.name, reason=message))
            return None
        build_seconds = time.monotonic() - started
        self.built[recipe.name] = artifact
        return self.evaluator.candidate(
            artifact,
            name=recipe.name,
            techniques=techniques,
            passes=applied,
            budget=self.config.max_accuracy_drop,
            relative=self.config.relative,
            build_seconds=build_seconds,
        )


def _chain_key(steps: tuple[recipes.Step, ...]) -> str:
    return json.dumps(steps, sort_keys=True)


def _label_kind(task: str) -> Literal["classification", "regression", "none"]:
    if task == "classification":
        return "classification"
    if task == "regression":
        return "regression"
    return "none"
