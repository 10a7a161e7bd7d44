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

from optimizer.artifact import ModelArtifact
from optimizer.errors import PassFailed
from optimizer.passes._util import LARGE_MODEL_BYTES, one_line, quiet_stdout, scratch_cwd
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

        try:
            with quiet_stdout(), scratch_cwd(target.parent):
                optimized = optimize_model(
                    str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, use_gpu=False
                )
                stats = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
                optimized.save_model_to_file(str(target), use_external_data_format=large)
        except Exception as exc:  # the fusion scripts raise assorted errors on graphs they do not expect
            message = one_line(exc, target.parent, source.parent, context.work_dir)
            if self.config.transformer_fusion == "on":
                raise PassFailed(f"{self.name}: transformer fusion failed: {message}") from exc
            context.log(f"{self.name}: transformer fusion skipped: {message}")
            return {"applied": False, "note": f"transformer fusion failed ({message}); skipped"}
        return {"applied": True, "fused_operators": stats}

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
            reason = one_line(exc, source.parent, context.work_dir)
            raise PassFailed(f"{self.name}: ONNX Runtime could not optimize the model: {reason}") from exc
        if not output.exists():
            raise PassFailed(f"{self.name}: ONNX Runtime wrote no optimized model")


def _op_counts(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
