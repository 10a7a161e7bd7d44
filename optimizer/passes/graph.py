"""Graph optimization: ONNX Runtime's offline-optimized model, after transformer fusions when the
model looks like a transformer.

ONNX Runtime applies its graph optimizations when a session is created and can save the result
(``SessionOptions.optimized_model_filepath``). We save at the "basic" level (constant folding,
redundant node elimination, Conv+BatchNorm folding...; provider independent) or "extended" (the
default: adds fusions such as Conv+activation -> FusedConv, GELU, LayerNorm, attention; contrib ops
of the provider the session ran on). The "all" level is not offered: it adds layout transforms
(NCHWc blocking) chosen for this machine's CPU instruction set, which ONNX Runtime recommends not to
serialize; a session still applies them at load time. Because extended fusions are specific to the
execution provider, the session here uses ``context.device``'s providers, so a model optimized on
CPU is meant to be served on CPU.

Transformer fusions (Attention, SkipLayerNormalization, BiasGelu...) come from
``onnxruntime.transformers.optimizer.optimize_model`` (model type "bert", heads and hidden size
detected from the graph, ``opt_level=0`` so it only fuses and stays provider independent). The
detection rule (:func:`looks_like_transformer`) is ours: ORT has no such test.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnx
from pydantic import Field

from optimizer.artifact import ModelArtifact
from optimizer.errors import PassFailed, first_line
from optimizer.passes._util import LARGE_MODEL_BYTES, quiet_stdout, scratch_cwd
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.registry import register

# Elementwise ops allowed between the score MatMul and the Softmax (scale, mask, casts).
_SCORE_HOPS = frozenset({"Div", "Mul", "Add", "Sub", "Where", "Cast"})


def looks_like_transformer(model: onnx.ModelProto) -> bool:
    """True when a Softmax is fed by a MatMul (through scale/mask ops) and a layer norm is present.

    A layer norm is a ``LayerNormalization`` node or the exported ReduceMean/Pow/Sqrt pattern.
    """
    nodes = list(model.graph.node)
    producers = {out: node for node in nodes for out in node.output}
    ops = {node.op_type for node in nodes}
    has_norm = "LayerNormalization" in ops or {"ReduceMean", "Pow", "Sqrt"} <= ops
    if not has_norm:
        return False
    return any(node.op_type == "Softmax" and _fed_by_matmul(node, producers, hops=3) for node in nodes)


def attention_shape(model: onnx.ModelProto) -> tuple[int, int]:
    """``(num_heads, hidden_size)`` read from the graph, or ``(0, 0)`` to let ORT try its own detection.

    ORT's detector reads the head count from the Q/K/V Reshape's constant shape; exporters that write
    ``view(..., -1, head_dim)`` (recent transformers releases) leave it -1 there, and the fusion then
    skips Attention. The hidden size is the width of the layer norms' scale; the head size is the last
    constant of the 4-D Reshape shapes (a constant tensor or a Concat of one-element pieces). Without a
    ``LayerNormalization`` node the hidden size is the width of the square projection weights.
    """
    from onnx import numpy_helper

    constants: dict[str, Any] = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in model.graph.node for out in node.output}
    hidden = Counter(
        int(constants[node.input[1]].size)
        for node in model.graph.node
        if node.op_type == "LayerNormalization" and len(node.input) > 1 and node.input[1] in constants
    )
    if not hidden:  # layer norm exported as ReduceMean/Pow/Sqrt: the square Q/K/V/O projections
        hidden = Counter(
            int(weight.shape[0])
            for node in model.graph.node
            if node.op_type == "MatMul"
            and (weight := constants.get(node.input[1])) is not None
            and weight.ndim == 2
            and weight.shape[0] == weight.shape[1]
        )
    head_sizes: Counter[int] = Counter()
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = _shape_values(node.input[1], constants, producers)
        if shape is not None and len(shape) == 4 and shape[3] > 0:
            head_sizes[shape[3]] += 1
    if not hidden or not head_sizes:
        return 0, 0
    width = hidden.most_common(1)[0][0]
    for head, _count in head_sizes.most_common():
        if width % head == 0 and width // head > 0:
            return width // head, width
    return 0, 0


def _shape_values(name: str, constants: dict[str, Any], producers: dict[str, onnx.NodeProto]) -> list[int] | None:
    """A Reshape's target shape when it is constant, or a Concat whose last pieces are (unknown -> 0)."""
    if name in constants:
        return [int(v) for v in constants[name].reshape(-1)]
    producer = producers.get(name)
    if producer is None or producer.op_type != "Concat":
        return None
    values: list[int] = []
    for piece in producer.input:
        value = constants.get(piece)
        if value is None:
            values.append(0)
        elif value.size == 1:
            values.append(int(value.reshape(-1)[0]))
        else:
            return None
    return values


def _fed_by_matmul(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], hops: int) -> bool:
    for name in node.input:
        producer = producers.get(name)
        if producer is None:
            continue
        if producer.op_type == "MatMul":
            return True
        if hops > 0 and producer.op_type in _SCORE_HOPS and _fed_by_matmul(producer, producers, hops - 1):
            return True
    return False


class GraphOptimizationConfig(PassConfig):
    """ORT optimization level to save at, and whether to run transformer fusions first."""

    level: Literal["basic", "extended"] = "extended"
    transformer_fusion: Literal["auto", "on", "off"] = "auto"
    num_heads: int = Field(default=0, ge=0)  # 0: detect from the graph
    hidden_size: int = Field(default=0, ge=0)  # 0: detect from the graph


@register
class GraphOptimization(Pass[GraphOptimizationConfig]):
    """ONNX Runtime's offline graph optimization, with transformer fusions for transformer models."""

    name: ClassVar[str] = "graph"
    technique: ClassVar[str] = "graph"
    config_class: ClassVar[type[PassConfig]] = GraphOptimizationConfig

    def run(self, model: ModelArtifact, context: PassContext) -> ModelArtifact:
        """Write the optimized model and record what changed in ``context.details``."""
        before = _op_counts(model.path)
        large = model.size_bytes > LARGE_MODEL_BYTES
        context.details["level"] = self.config.level
        context.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="graph-", dir=context.work_dir) as tmp:
            scratch = Path(tmp).resolve()
            source = model.path.resolve()
            if self._wants_fusion(source):
                fused = scratch / "fused.onnx"
                info = self._fuse(source, fused, large, context)
                context.details["transformer_fusion"] = info
                if info["applied"]:
                    source = fused
            output = context.output_path(self.name)
            self._optimize(source, output, large, context)
        after = _op_counts(output)
        context.details.update(
            nodes_before=sum(before.values()),
            nodes_after=sum(after.values()),
            op_types_added=sorted(after.keys() - before.keys()),
            op_types_removed=sorted(before.keys() - after.keys()),
        )
        return ModelArtifact.from_onnx_file(output)

    def _wants_fusion(self, path: Path) -> bool:
        if self.config.transformer_fusion == "off":
            return False
        if self.config.transformer_fusion == "on":
            return True
        return looks_like_transformer(onnx.load(str(path), load_external_data=False))

    def _fuse(self, source: Path, target: Path, large: bool, context: PassContext) -> dict[str, Any]:
        from onnxruntime.transformers.optimizer import optimize_model

        heads, hidden = self.config.num_heads, self.config.hidden_size
        if not (heads and hidden):
            heads, hidden = attention_shape(onnx.load(str(source), load_external_data=False))
        try:
            with quiet_stdout(), scratch_cwd(target.parent):
                optimized = optimize_model(
                    str(source), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0, use_gpu=False
                )
                stats = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
                optimized.save_model_to_file(str(target), use_external_data_format=large)
        except Exception as exc:  # the fusion scripts raise assorted errors on graphs they do not expect
            message = first_line(exc, target.parent, source.parent, context.work_dir)
            if self.config.transformer_fusion == "on":
                raise PassFailed(f"{self.name}: transformer fusion failed: {message}") from exc
            context.log(f"{self.name}: transformer fusion skipped: {message}")
            return {"applied": False, "note": f"transformer fusion failed ({message}); skipped"}
        return {"applied": True, "fused_operators": stats, "num_heads": heads, "hidden_size": hidden}

    def _optimize(self, source: Path, output: Path, large: bool, context: PassContext) -> None:
        import onnxruntime as ort

        from optimizer.runtime import select_providers, session_options

        options = context.runtime.model_copy(
            update={"device": context.device, "graph_optimization_level": self.config.level}
        )
        try:
            so = session_options(options, optimized_model_filepath=str(output))
            if large:
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", output.name + ".data"
                )
                so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(source), sess_options=so, providers=select_providers(options))
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            output.unlink(missing_ok=True)
            reason = first_line(exc, source.parent, context.work_dir)
            raise PassFailed(f"{self.name}: ONNX Runtime could not optimize the model: {reason}") from exc
        if not output.exists():
            raise PassFailed(f"{self.name}: ONNX Runtime wrote no optimized model")


def _op_counts(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
