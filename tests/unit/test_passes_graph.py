"""The graph pass: ONNX Runtime's offline optimization and transformer fusions, on tiny real models."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.errors import InvalidConfig, PassFailed
from optimizer.passes import registry
from optimizer.passes.base import PassContext
from optimizer.passes.graph import attention_shape, looks_like_transformer

RNG = np.random.default_rng(3)


def run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ``path`` with an unoptimized CPU session (the reference semantics)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two output arrays, flattened."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(path: Path) -> Counter[str]:
    """Op-type counts of the model at ``path``."""
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def context(tmp_path: Path) -> PassContext:
    """A CPU pass context (the graph pass needs no data)."""
    return PassContext(work_dir=tmp_path / "work", calibration=SampleData({}))


def conv_bn_relu(path: Path) -> Path:
    """x[batch, 3, 8, 8] -> Conv -> BatchNormalization -> Relu, built with onnx.helper."""
    w = RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    scale, bias = RNG.uniform(0.5, 1.5, 4).astype(np.float32), RNG.normal(0, 0.1, 4).astype(np.float32)
    mean, var = RNG.normal(0, 0.1, 4).astype(np.float32), RNG.uniform(0.5, 2, 4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], name="bn"),
            helper.make_node("Relu", ["n"], ["y"], name="relu"),
        ],
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w, "w"), (scale, "scale"), (bias, "bias"), (mean, "mean"), (var, "var"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def bert_layer(path: Path, opset: int, heads_in_graph: bool = True) -> Path:
    """One BERT-style encoder layer (attention with a padding mask, GELU FFN, post layer norms).

    At opset 17 torch exports ``LayerNormalization``; at 13 the ReduceMean/Pow/Sqrt pattern. With
    ``heads_in_graph=False`` heads are split as ``view(b, s, -1, head_dim)`` (recent transformers),
    which leaves -1 where ONNX Runtime's own detector looks for the head count.
    """
    import torch

    dim, heads = 16, 2
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
            self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
            self.up, self.down = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

        def split(self, t: torch.Tensor) -> torch.Tensor:
            count = heads if heads_in_graph else -1
            return t.view(t.shape[0], t.shape[1], count, dim // heads).transpose(1, 2)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dim // heads)
            scores = scores + (1.0 - mask[:, None, None, :].to(torch.float32)) * -10000.0
            context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)
            h = self.ln1(self.o(context.reshape(x.shape[0], x.shape[1], dim)) + x)
            return self.ln2(self.down(torch.nn.functional.gelu(self.up(h))) + h)

    torch.onnx.export(
        Layer().eval(),
        (torch.randn(2, 5, dim), torch.ones(2, 5, dtype=torch.int64)),
        str(path),
        input_names=["x", "mask"],
        output_names=["y"],
        dynamic_axes={name: {0: "batch", 1: "seq"} for name in ("x", "mask", "y")},
        dynamo=False,
        opset_version=opset,
    )
    return path


@pytest.fixture(scope="module")
def bert13(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT-style layer exported at opset 13 (layer norm as ReduceMean/Pow/Sqrt)."""
    return bert_layer(tmp_path_factory.mktemp("bert") / "bert13.onnx", 13)


def bert_feed() -> dict[str, np.ndarray]:
    """3 sequences of 7 tokens, the first one padded after 5."""
    mask = np.ones((3, 7), np.int64)
    mask[0, 5:] = 0
    return {"x": RNG.normal(size=(3, 7, 16)).astype(np.float32), "mask": mask}


def test_basic_level_folds_batch_norm_into_conv(tmp_path: Path) -> None:
    source = conv_bn_relu(tmp_path / "conv_bn.onnx")
    assert ops(source)["BatchNormalization"] == 1
    ctx = context(tmp_path)
    out = registry.build("graph", {"level": "basic"}).run(ModelArtifact.from_onnx_file(source), ctx)
    assert ops(out.path)["BatchNormalization"] == 0
    assert "BatchNormalization" in ctx.details["op_types_removed"]
    assert ctx.details["nodes_after"] < ctx.details["nodes_before"]
    assert "transformer_fusion" not in ctx.details
    feed = {"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    assert cosine(run(source, feed), run(out.path, feed)) > 0.9999


def test_extended_level_fuses_conv_and_activation(cnn_model: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path)
    out = registry.build("graph").run(ModelArtifact.from_onnx_file(cnn_model), ctx)
    assert ops(out.path)["FusedConv"] == 2 and ops(out.path)["Relu"] == 0
    assert ctx.details["level"] == "extended" and "FusedConv" in ctx.details["op_types_added"]
    assert "transformer_fusion" not in ctx.details  # auto: a CNN is not a transformer
    feed = {"x": RNG.normal(size=(4, 1, 8, 8)).astype(np.float32)}
    assert cosine(run(cnn_model, feed), run(out.path, feed)) > 0.9999


def test_transformer_detection(bert13: Path, mlp_model: Path, cnn_model: Path) -> None:
    assert looks_like_transformer(onnx.load(str(bert13)))
    assert not looks_like_transformer(onnx.load(str(mlp_model)))
    assert not looks_like_transformer(onnx.load(str(cnn_model)))
    no_softmax = onnx.load(str(bert13))
    for node in no_softmax.graph.node:
        if node.op_type == "Softmax":
            node.op_type = "Sigmoid"
    assert not looks_like_transformer(no_softmax)


def test_transformer_detection_with_layer_normalization_op(tmp_path: Path) -> None:
    model = onnx.load(str(bert_layer(tmp_path / "bert17.onnx", 17)))
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}
    assert looks_like_transformer(model)


def test_transformer_fusion_fuses_attention_and_keeps_outputs(bert13: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path)
    out = registry.build("graph").run(ModelArtifact.from_onnx_file(bert13), ctx)
    fused = ctx.details["transformer_fusion"]
    assert fused["applied"] is True
    assert fused["fused_operators"]["Attention"] == 1
    assert fused["fused_operators"]["SkipLayerNormalization"] == 2
    counts = ops(out.path)
    assert counts["Attention"] == 1 and counts["SkipLayerNormalization"] == 2 and counts["Softmax"] == 0
    feed = bert_feed()
    assert cosine(run(bert13, feed), run(out.path, feed)) > 0.9999
    assert sorted(p.name for p in ctx.work_dir.iterdir()) == [out.path.name]


@pytest.mark.parametrize("opset", [13, 17])
def test_heads_are_detected_when_the_export_hides_them(opset: int, tmp_path: Path) -> None:
    path = bert_layer(tmp_path / "hidden-heads.onnx", opset, heads_in_graph=False)
    assert attention_shape(onnx.load(str(path))) == (2, 16)
    ctx = context(tmp_path / "work")
    out = registry.build("graph").run(ModelArtifact.from_onnx_file(path), ctx)
    assert ctx.details["transformer_fusion"]["fused_operators"]["Attention"] == 1
    feed = bert_feed()
    assert cosine(run(path, feed), run(out.path, feed)) > 0.9999


def test_dynamic_quantization_of_a_fused_transformer_uses_qattention(bert13: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path)
    fused = registry.build("graph", {"level": "basic"}).run(ModelArtifact.from_onnx_file(bert13), ctx)
    quantized = registry.build("int8_dynamic").run(fused, ctx)
    counts = ops(quantized.path)
    assert counts["QAttention"] == 1 and counts["MatMulInteger"] >= 2
    feed = bert_feed()
    assert cosine(run(bert13, feed), run(quantized.path, feed)) > 0.99


def test_transformer_fusion_off_leaves_attention_unfused(bert13: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path)
    out = registry.build("graph", {"transformer_fusion": "off"}).run(ModelArtifact.from_onnx_file(bert13), ctx)
    assert "transformer_fusion" not in ctx.details
    assert ops(out.path)["Attention"] == 0 and ops(out.path)["Softmax"] == 1
    feed = bert_feed()
    assert cosine(run(bert13, feed), run(out.path, feed)) > 0.9999


def test_ort_failure_is_one_line_pass_failure_without_paths(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="bad")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bad.onnx"))
    ctx = context(tmp_path)
    with pytest.raises(PassFailed, match=r"^graph: ") as info:
        registry.build("graph").run(ModelArtifact.from_onnx_file(tmp_path / "bad.onnx"), ctx)
    assert "\n" not in str(info.value) and str(tmp_path) not in str(info.value)
    assert list(ctx.work_dir.iterdir()) == []


@pytest.mark.parametrize("config", [{"levl": "basic"}, {"level": "all"}, {"transformer_fusion": "yes"}])
def test_registry_refuses_bad_configs(config: dict[str, str]) -> None:
    with pytest.raises(InvalidConfig, match="graph"):
        registry.build("graph", config)
