"""Pruning and fine-tuning passes: the network itself made smaller, then its accuracy trained back.

Both passes cross into PyTorch and back: the ONNX model becomes an eager module through
``onnx2torch`` (:mod:`optimizer.torchbridge`), is changed there, and is exported to ONNX again with
its original input and output names, then checked against the torch module in ONNX Runtime. Every
upload format takes this route (a TorchScript or ``.pt2`` upload was already converted to ONNX
when it was loaded), so the model families supported are those onnx2torch converts: CNNs and MLPs
built from Conv / BatchNorm / Gemm / pooling / activations. A model it cannot convert (transformer
encoders often use operators it lacks) fails the pass with the operator named; the other
candidates go on.

- ``prune`` removes whole channels / neurons with Torch-Pruning (:mod:`optimizer.pruning`), so the
  exported model is smaller and faster; ``method="unstructured"`` zeroes weights instead (smaller
  when compressed, not faster: the report's speedup is measured, so it shows). With ``steps`` > 1
  it prunes gradually, training the module for ``step_epochs`` between two steps (as ``finetune``
  trains), so each step removes a little from a network that has recovered from the last one.
- ``finetune`` trains the model (:mod:`optimizer.training`): on the sample's labels and, by
  default, distilled from the original model too (the teacher, run in ONNX Runtime); without
  labels, distillation alone. Image inputs are augmented by default when distilling (shifted,
  noisy copies with the teacher's outputs as targets). On a pruned MobileNet-like CNN with 360
  training images, distillation took top-1 from 0.971 to 0.984 at 30% pruning, and pruning 50%
  in 5 steps instead of at once from 0.978 to 0.987-0.991 (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.registry import register
from optimizer.training import FinetuneConfig  # pydantic only: torch is imported when a run starts

#: Samples used to trace the module and to check the export.
_TRACE_SAMPLES = 8


def _torch_missing() -> str | None:
    needed = ("torch", "torch_pruning", "onnx2torch")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    how = "pip install 'slimserve[torch]' && pip install --no-deps onnx2torch==1.5.15"
    return f"needs {', '.join(missing)} ({how})"


def _names(model: ModelArtifact) -> tuple[list[str], list[str]]:
    return [spec.name for spec in model.inputs], [spec.name for spec in model.outputs]


def _trace_sample(context: PassContext, inputs: list[str]) -> dict[str, np.ndarray]:
    feed = context.calibration.head(_TRACE_SAMPLES).inputs
    return {name: np.ascontiguousarray(feed[name]) for name in inputs}


#: Models onnx2torch could not convert, by (path, size, mtime): every pruning ratio shares one answer.
_UNCONVERTIBLE: dict[tuple[str, int, int], str] = {}


def _to_torch(model: ModelArtifact, sample: dict[str, np.ndarray]) -> Any:
    from optimizer.errors import ConversionFailed
    from optimizer.torchbridge import onnx_to_torch

    info = model.path.stat()
    key = (str(model.path), info.st_size, info.st_mtime_ns)
    if key in _UNCONVERTIBLE:
        raise ConversionFailed(_UNCONVERTIBLE[key])
    try:
        return onnx_to_torch(model.path, sample)
    except ConversionFailed as exc:
        _UNCONVERTIBLE[key] = str(exc)
        raise


def _load(model: ModelArtifact, context: PassContext) -> tuple[Any, dict[str, np.ndarray], list[str]]:
    """The model as a torch module, the sample that traces and checks it, and the input names."""
    inputs, _ = _names(model)
    sample = _trace_sample(context, inputs)
    return _to_torch(model, sample), sample, inputs


def _publish(
    module: Any,
    model: ModelArtifact,
    context: PassContext,
    sample: dict[str, np.ndarray],
    stem: str,
    details: dict[str, Any],
) -> ModelArtifact:
    """Export ``module`` with ``model``'s names, check it in ONNX Runtime, record ``details``."""
    from optimizer.torchbridge import export_onnx, verify_onnx

    inputs, outputs = _names(model)
    path = context.output_path(stem)
    export_onnx(module, sample, path, input_names=inputs, output_names=outputs, opset=model.opset)
    context.details.update({**details, "export_max_abs_diff": verify_onnx(module, path, sample)})
    return ModelArtifact.from_onnx_file(path, source_format=model.source_format)


class PruneConfig(PassConfig):
    """How much to remove, how to choose it, and channel counts rounded for fast kernels.

    ``steps`` > 1 prunes gradually (structured only): ``ratio * i / steps`` at step ``i``, with
    ``step_epochs`` epochs of fine-tuning between steps (labels and distillation from the
    original, as the finetune pass trains; a final finetune step still follows in the recipes).
    ``global_pruning`` ranks channels across layers, each losing at most ``max_layer_ratio``.
    """

    ratio: float = Field(0.5, gt=0, lt=1)
    method: Literal["structured", "unstructured"] = "structured"
    importance: Literal["magnitude", "taylor", "lamp"] = "magnitude"
    round_to: int | None = Field(8, ge=1)
    steps: int = Field(1, ge=1, le=20)
    step_epochs: int = Field(3, ge=1)
    global_pruning: bool = False
    max_layer_ratio: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _structured_only(self) -> PruneConfig:
        if self.method == "unstructured" and (self.steps > 1 or self.global_pruning or self.max_layer_ratio):
            raise ValueError("steps, global_pruning and max_layer_ratio apply to structured pruning only")
        return self


@register
class Prune(Pass[PruneConfig]):
    """Remove a fraction of every prunable layer's channels (structured) or weights (unstructured)."""

    name: ClassVar[str] = "prune"
    technique: ClassVar[str] = "prune"
    config_class: ClassVar[type[PassConfig]] = PruneConfig

    def skip_reason(self, model: ModelArtifact, context: PassContext) -> str | None:
        """Pruning needs PyTorch, Torch-Pruning and onnx2torch."""
        return _torch_missing()

    def run(self, model: ModelArtifact, context: PassContext) -> ModelArtifact:
        """Convert, prune, export, verify; the channel and parameter counts go into the details."""
        from optimizer import pruning

        module, sample, inputs = _load(model, context)
        steps: list[dict[str, Any]] = []
        if self.config.method == "unstructured":
            info = pruning.prune_unstructured(module, amount=self.config.ratio)
        else:
            loss_fn = _taylor_loss(module, context.calibration, inputs) if self.config.importance == "taylor" else None
            between = None
            if self.config.steps > 1:
                between, steps = _step_trainer(module, model, context, inputs, self.config)
            info = pruning.prune_structured(
                module,
                sample,
                ratio=self.config.ratio,
                importance=self.config.importance,
                round_to=self.config.round_to,
                loss_fn=loss_fn,
                input_names=inputs,
                steps=self.config.steps,
                between=between,
                global_pruning=self.config.global_pruning,
                max_layer_ratio=self.config.max_layer_ratio,
            )
        stem = f"prune-{round(self.config.ratio * 100)}"
        pruned = info.model_dump(mode="json") | ({"step_training": steps} if steps else {})
        return _publish(module, model, context, sample, stem, {"pruning": pruned})


def _step_trainer(
    module: Any, model: ModelArtifact, context: PassContext, inputs: list[str], config: PruneConfig
) -> tuple[Any, list[dict[str, Any]]]:
    """The fine-tuning run between two pruning steps, and the list its summaries go into.

    The precision measured for the first run is reused by the later ones (no second probe).
    """
    from optimizer.training import fine_tune

    teacher = _teacher(context.original or model, context)
    runs: list[dict[str, Any]] = []
    options: dict[str, Any] = {"epochs": config.step_epochs, "patience": config.step_epochs}

    def between(step: int) -> None:
        tuned, report = fine_tune(
            module,
            context.calibration,
            None,
            FinetuneConfig(**options),
            input_names=inputs,
            teacher=teacher,
            device=context.device,
            deadline=context.deadline,
            seed=context.seed + step,
        )
        tuned.to("cpu")
        options["precision"] = report.precision
        best = report.history[report.best_epoch - 1]
        runs.append(
            {"after_step": step, "epochs": len(report.history), "best_val_loss": best.val_loss,
             "val_accuracy": best.val_accuracy, "precision": report.precision, "seconds": round(report.seconds, 3)}
        )  # fmt: skip

    return between, runs


def _taylor_loss(module: Any, data: SampleData, inputs: list[str]) -> Any:
    """Taylor importance's loss: cross-entropy on integer labels, else distance from the unpruned outputs."""
    import torch

    batch = data.head(64)
    tensors = [torch.from_numpy(np.ascontiguousarray(batch.inputs[name])) for name in inputs]
    labels = batch.labels
    with torch.no_grad():
        reference = module(*tensors).detach()

    def loss(current: Any) -> Any:
        out = current(*tensors)
        if labels is not None and np.issubdtype(labels.dtype, np.integer) and out.ndim == 2:
            return torch.nn.functional.cross_entropy(out.float(), torch.from_numpy(labels.astype(np.int64)))
        return torch.nn.functional.mse_loss(out.float(), reference.float())

    return loss


class FinetunePassConfig(FinetuneConfig, PassConfig):
    """The training package's options (optimizer, learning rate, early stopping, precision, search,
    workers), and ``distill``: learn from the original model's outputs as well as from the labels
    (knowledge distillation; without labels the original's outputs are the only signal)."""

    distill: bool = True


@register
class Finetune(Pass[FinetunePassConfig]):
    """Train the model on the calibration split (labels, or the original as teacher), early-stopped."""

    name: ClassVar[str] = "finetune"
    technique: ClassVar[str] = "finetune"
    config_class: ClassVar[type[PassConfig]] = FinetunePassConfig

    def skip_reason(self, model: ModelArtifact, context: PassContext) -> str | None:
        """Fine-tuning needs PyTorch and onnx2torch."""
        return _torch_missing()

    def run(self, model: ModelArtifact, context: PassContext) -> ModelArtifact:
        """Convert, train, export, verify; the training report goes into the details."""
        from optimizer.training import fine_tune

        module, sample, inputs = _load(model, context)
        teacher = None
        if self.config.distill or context.calibration.labels is None:
            teacher = _teacher(context.original or model, context)
        module, report = fine_tune(
            module,
            context.calibration,
            None,
            self.config,
            input_names=inputs,
            teacher=teacher,
            device=context.device,
            deadline=context.deadline,
            seed=context.seed,
        )
        return _publish(module, model, context, sample, "finetune", {"training": report.model_dump(mode="json")})


def _teacher(original: ModelArtifact, context: PassContext) -> Any:
    """The original model in ONNX Runtime as a function of a feed: its first output."""
    from optimizer.runtime import create_session

    session = create_session(original.path, context.runtime)
    first = original.outputs[0].name

    def predict(feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run([first], feed)[0])

    return predict
