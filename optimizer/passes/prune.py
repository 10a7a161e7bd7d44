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
  when compressed, not faster: the report's speedup is measured, so it shows).
- ``finetune`` trains the model (:mod:`optimizer.training`): on the sample's labels and, by
  default, distilled from the original model too (the teacher, run in ONNX Runtime); without
  labels, distillation alone. On a pruned MobileNet-like CNN with 360 training images,
  distillation took top-1 from 0.971 to 0.984 at 30% pruning (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

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


#: Models onnx2torch could not convert, by (path, size, mtime): the three pruning ratios share one answer.
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
    """How much to remove, how to choose it, and channel counts rounded for fast kernels."""

    ratio: float = Field(0.5, gt=0, lt=1)
    method: Literal["structured", "unstructured"] = "structured"
    importance: Literal["magnitude", "taylor", "lamp"] = "magnitude"
    round_to: int | None = Field(8, ge=1)


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
        if self.config.method == "unstructured":
            info = pruning.prune_unstructured(module, amount=self.config.ratio)
        else:
            loss_fn = _taylor_loss(module, context.calibration, inputs) if self.config.importance == "taylor" else None
            info = pruning.prune_structured(
                module,
                sample,
                ratio=self.config.ratio,
                importance=self.config.importance,
                round_to=self.config.round_to,
                loss_fn=loss_fn,
                input_names=inputs,
            )
        stem = f"prune-{round(self.config.ratio * 100)}"
        return _publish(module, model, context, sample, stem, {"pruning": info.model_dump(mode="json")})


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
