"""Accuracy-aware fallback: when an int8 candidate misses the accuracy budget, keep the nodes whose
quantization hurts most in float, a growing number at a time.

Ranking (:func:`node_sensitivity`) uses ONNX Runtime's ``qdq_loss_debug`` tools to record every float
intermediate tensor of the float model and of the quantized model on the same feeds
(``modify_model_output_intermediate_tensors`` + ``collect_activations``). The error of a tensor is its
relative L2 error against the float model, ``||float - quantized|| / ||float||``:

* QDQ models (static): ``create_activation_matching`` pairs each activation's float value with its
  value after the QuantizeLinear/DequantizeLinear pair, ``compute_activation_error`` measures it.
  Tensors without a QDQ pair are compared by name. A quantized node is a node of the QDQ model (same
  name as in the float model) with an input coming from a DequantizeLinear.
* Dynamic models: ORT's dynamic quantizer keeps the names of the tensors it does not replace, so the
  output of a quantized MatMul/Conv keeps its name (``h0``), while the node itself is replaced
  (``fc1`` becomes ``fc1_quant``, a MatMulInteger). Tensors are compared by name; a quantized node is a
  float-model node whose name no longer exists in the quantized model.

A node's score is the error on its outputs minus the largest error already present on its activation
inputs (clipped at zero): the error its own quantization adds. ORT's tools give the per-tensor
errors; the attribution to nodes is ours because ORT offers none.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
from pydantic import Field, model_validator

from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.errors import InvalidConfig, OptimizerError, PassFailed, first_line
from optimizer.passes import registry
from optimizer.passes._util import quiet_stdout
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.quantize import (
    FeedReader,
    Prepared,
    QuantizationPass,
    model_feeds,
    quantization_summary,
    stage_model,
)
from optimizer.passes.registry import register

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def node_sensitivity(
    float_model: ModelArtifact,
    quantized_model: ModelArtifact,
    data: SampleData,
    *,
    work_dir: Path | None = None,
    batch_size: int = 16,
    max_samples: int = 16,
    op_types: Collection[str] | None = None,
) -> list[tuple[str, float]]:
    """``(node name in the float model, error its quantization adds)`` per quantized node, worst first.

    ``op_types`` are the op types the QDQ quantizer was asked to quantize (default: ORT's own default
    list); a node of another type may read a dequantized tensor but is not itself quantized, and
    excluding it would change nothing. Every float intermediate tensor of both models is kept in
    memory for ``max_samples`` samples, so keep it small for large models. Scratch files go to a
    temporary folder inside ``work_dir``.
    """
    feeds = model_feeds(data, float_model, batch_size, max_samples)
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sensitivity-", dir=work_dir) as tmp:
        scratch = Path(tmp)
        float_acts = _activations(float_model.path, scratch / "float.onnx", feeds)
        quant_acts = _activations(quantized_model.path, scratch / "quantized.onnx", feeds)
    float_proto = onnx.load(str(float_model.path), load_external_data=False)
    quant_proto = onnx.load(str(quantized_model.path), load_external_data=False)
    if any(node.op_type == "QuantizeLinear" for node in quant_proto.graph.node):
        scores = _qdq_scores(float_proto, quant_proto, _qdq_errors(float_acts, quant_acts), op_types)
    else:
        compared = {
            name: relative_error(float_acts[name], quant_acts[name]) for name in float_acts.keys() & quant_acts.keys()
        }
        errors = {name: value for name, value in compared.items() if np.isfinite(value)}
        scores = _dynamic_scores(float_proto, quant_proto, errors)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def relative_error(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """``||reference - other|| / ||reference||`` over all batches (NaN when the shapes differ)."""
    a = np.concatenate([np.ravel(v) for v in reference]).astype(np.float64)
    b = np.concatenate([np.ravel(v) for v in other]).astype(np.float64)
    if a.shape != b.shape:
        return float("nan")
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-6 * np.sqrt(max(a.size, 1))))


def _activations(model: Path, staged: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        modify_model_output_intermediate_tensors,
    )

    stage_model(model, staged)
    augmented = staged.with_name(staged.stem + "-augmented.onnx")
    try:
        modify_model_output_intermediate_tensors(str(staged), str(augmented))
        with quiet_stdout():
            return collect_activations(str(augmented), FeedReader(feeds))
    except Exception as exc:  # onnx/ORT errors while augmenting or running
        raise PassFailed(f"sensitivity analysis failed: {first_line(exc, staged.parent)}") from exc


def _qdq_errors(float_acts: dict[str, list[np.ndarray]], quant_acts: dict[str, list[np.ndarray]]) -> dict[str, float]:
    from onnxruntime.quantization.qdq_loss_debug import compute_activation_error, create_activation_matching

    matching = create_activation_matching(quant_acts, float_acts)
    matching = {name: match for name, match in matching.items() if "float" in match}
    errors = {name: e["xmodel_err"] for name, e in compute_activation_error(matching, relative_error).items()}
    for name in (float_acts.keys() & quant_acts.keys()) - errors.keys():
        errors[name] = relative_error(float_acts[name], quant_acts[name])
    return {name: value for name, value in errors.items() if np.isfinite(value)}


def _original_name(tensor: str) -> str:
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    for suffix in (DEQUANT_OUTPUT_SUFFIX + "_1", DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX):
        if tensor.endswith(suffix):
            return tensor[: -len(suffix)]
    return tensor


def _score(outputs: list[str], inputs: list[str], errors: dict[str, float]) -> float | None:
    out = [errors[name] for name in outputs if name in errors]
    if not out:
        return None
    return max(max(out) - max((errors[name] for name in inputs if name in errors), default=0.0), 0.0)


def _qdq_scores(
    float_proto: onnx.ModelProto,
    quant_proto: onnx.ModelProto,
    errors: dict[str, float],
    op_types: Collection[str] | None,
) -> dict[str, float]:
    if op_types is None:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        op_types = set(QDQRegistry) | set(QLinearOpsRegistry)  # quantize_static's default
    float_names = {node.name for node in float_proto.graph.node}
    initializers = {init.name for init in quant_proto.graph.initializer}
    producers = {out: node for node in quant_proto.graph.node for out in node.output}
    scores: dict[str, float] = {}
    for node in quant_proto.graph.node:
        if node.op_type in _QDQ_OPS or node.op_type not in op_types or node.name not in float_names:
            continue
        activations: list[str] = []
        quantized = False
        for name in node.input:
            producer = producers.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                quantized = True
                if producer.input[0] in initializers:
                    continue  # a quantized weight or bias
                activations.append(_original_name(name))
            elif name and name not in initializers:
                activations.append(name)
        score = _score([_original_name(o) for o in node.output], activations, errors) if quantized else None
        if score is not None:
            scores[node.name] = score
    return scores


def _dynamic_scores(
    float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto, errors: dict[str, float]
) -> dict[str, float]:
    kept = {node.name for node in quant_proto.graph.node}
    initializers = {init.name for init in float_proto.graph.initializer}
    scores: dict[str, float] = {}
    for node in float_proto.graph.node:
        if node.name in kept:
            continue  # the quantizer left this node alone
        inputs = [name for name in node.input if name and name not in initializers]
        score = _score(list(node.output), inputs, errors)
        if score is not None:
            scores[node.name] = score
    return scores


class QuantizationFallbackConfig(PassConfig):
    """The base quantization pass and config, and how far the fallback may go."""

    base: Literal["int8_dynamic", "int8_static"] = "int8_static"
    base_config: dict[str, Any] = Field(default_factory=dict)
    max_trials: int = Field(default=6, ge=1)
    max_excluded_fraction: float = Field(default=0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_base_config(self) -> QuantizationFallbackConfig:
        try:
            registry.build(self.base, self.base_config)
        except InvalidConfig as exc:
            raise ValueError(str(exc)) from exc
        return self


@register
class QuantizationFallback(Pass[QuantizationFallbackConfig]):
    """Quantize, and while the accuracy budget is missed keep the most sensitive 1, 2, 4... nodes float."""

    name: ClassVar[str] = "int8_fallback"
    technique: ClassVar[str] = "int8-fallback"
    config_class: ClassVar[type[PassConfig]] = QuantizationFallbackConfig

    def run(self, model: ModelArtifact, context: PassContext) -> ModelArtifact:
        """The candidate with the fewest float nodes that meets the budget, else the lowest drop."""
        if context.accuracy_drop is None or context.budget is None:
            raise PassFailed(f"{self.name}: needs an accuracy measure and an accuracy budget")
        base = registry.build(self.config.base, self.config.base_config)
        if not isinstance(base, QuantizationPass):
            raise PassFailed(f"{self.name}: {self.config.base!r} is not a quantization pass")
        trials: list[dict[str, Any]] = []
        found: list[tuple[ModelArtifact, float, list[str]]] = []
        try:
            with base.prepared(model, context) as prepared:
                context.details.update(prepared.notes)
                self._search(base, prepared, context, context.budget, trials, found)
        except BaseException:
            for artifact, _, _ in found:
                artifact.path.unlink(missing_ok=True)
            raise
        chosen = self._choose(found, context.budget)
        for artifact, _, _ in found:
            if artifact.path != chosen[0].path:
                artifact.path.unlink(missing_ok=True)
        context.details.update(quantization_summary(chosen[0].path))
        context.details.update(
            base=base.name,
            trials=trials,
            met_budget=chosen[1] <= context.budget,
            fallback_nodes=chosen[2],
            nodes_excluded=list(dict.fromkeys([*base.config.nodes_to_exclude, *chosen[2]])),
        )
        return chosen[0]

    def _search(
        self,
        base: QuantizationPass[Any],
        prepared: Prepared,
        context: PassContext,
        budget: float,
        trials: list[dict[str, Any]],
        found: list[tuple[ModelArtifact, float, list[str]]],
    ) -> None:
        """Quantize, then exclude the worst 1, 2, 4... nodes until the budget is met or limits hit."""
        stem = f"{self.name}-{base.name}"
        candidate = base.quantize(prepared, context, stem=stem)
        drop = self._measure(candidate, context)
        trials.append({"excluded": 0, "accuracy_drop": drop})
        found.append((candidate, drop, []))
        if drop <= budget:
            return
        ranking = self._rank(base, prepared.model, candidate, context)
        limit = min(int(self.config.max_excluded_fraction * len(ranking)), len(ranking) - 1)
        count = 1
        while len(trials) <= self.config.max_trials and 1 <= count <= limit:
            excluded = [name for name, _ in ranking[:count]]
            try:
                candidate = base.quantize(prepared, context, exclude=excluded, stem=stem)
            except PassFailed as exc:  # keep what was found so far
                trials.append({"excluded": count, "error": str(exc)})
                return
            drop = self._measure(candidate, context)
            trials.append({"excluded": count, "accuracy_drop": drop})
            found.append((candidate, drop, excluded))
            if drop <= budget or count == limit:
                return
            count = min(count * 2, limit)

    @staticmethod
    def _choose(
        found: list[tuple[ModelArtifact, float, list[str]]], budget: float
    ) -> tuple[ModelArtifact, float, list[str]]:
        meeting = [item for item in found if item[1] <= budget]
        if meeting:
            return min(meeting, key=lambda item: len(item[2]))
        return min(found, key=lambda item: (item[1], len(item[2])))

    def _measure(self, candidate: ModelArtifact, context: PassContext) -> float:
        assert context.accuracy_drop is not None
        try:
            return float(context.accuracy_drop(candidate))
        except OptimizerError as exc:
            raise PassFailed(f"{self.name}: measuring a candidate failed: {exc}") from exc

    def _rank(
        self, base: QuantizationPass[Any], float_model: ModelArtifact, candidate: ModelArtifact, context: PassContext
    ) -> list[tuple[str, float]]:
        batch = int(getattr(base.config, "calibration_batch_size", 16))
        try:
            ranking = node_sensitivity(
                float_model,
                candidate,
                context.calibration,
                work_dir=context.work_dir,
                batch_size=batch,
                op_types=base.quantized_op_types(),
            )
        except PassFailed as exc:  # keep the base candidate rather than fail the whole pass
            context.details["sensitivity_error"] = str(exc)
            return []
        ranking = [(name, score) for name, score in ranking if name not in base.config.nodes_to_exclude]
        context.details["sensitivity"] = [[name, round(score, 6)] for name, score in ranking[:10]]
        context.log(f"{self.name}: most sensitive nodes: {', '.join(name for name, _ in ranking[:3])}")
        return ranking
