"""int8_dynamic and int8_static on tiny real models, run with real ONNX Runtime."""

from __future__ import annotations

import tempfile
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
from optimizer.passes.quantize import model_feeds

RNG = np.random.default_rng(7)
MLP_X = RNG.normal(size=(40, 16)).astype(np.float32)
CNN_X = RNG.normal(size=(40, 1, 8, 8)).astype(np.float32)


def run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ``path`` on ``feed`` with a plain CPU session."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-sample cosine similarity."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def ops(path: Path) -> Counter[str]:
    """Op-type counts of the model at ``path``."""
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def node(path: Path, name: str) -> onnx.NodeProto:
    """The node called ``name``."""
    return next(n for n in onnx.load(str(path)).graph.node if n.name == name)


def producers(path: Path) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node writing it."""
    return {out: n for n in onnx.load(str(path)).graph.node for out in n.output}


def initializer(path: Path, name: str) -> np.ndarray:
    """The initializer called ``name`` as an array."""
    init = next(i for i in onnx.load(str(path)).graph.initializer if i.name == name)
    return numpy_helper.to_array(init)


def context(tmp_path: Path, x: np.ndarray) -> PassContext:
    """A pass context calibrating on ``x``."""
    return PassContext(work_dir=tmp_path / "work", calibration=SampleData({"x": x}))


def test_dynamic_quantization_uses_integer_ops_and_stays_close(mlp_model: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path, MLP_X)
    out = registry.build("int8_dynamic").run(ModelArtifact.from_onnx_file(mlp_model), ctx)
    counts = ops(out.path)
    assert counts["MatMulInteger"] == 2 and counts["DynamicQuantizeLinear"] == 2
    assert counts["MatMul"] == 0
    assert initializer(out.path, "w1_quantized").dtype == np.int8
    assert ctx.details["int8_initializers"] >= 2
    assert cosine(run(mlp_model, {"x": MLP_X}), run(out.path, {"x": MLP_X})) > 0.99


def test_dynamic_options_reach_the_quantizer(mlp_model: Path, tmp_path: Path) -> None:
    config = {"per_channel": True, "weight_type": "quint8", "nodes_to_exclude": ["fc2"]}
    out = registry.build("int8_dynamic", config).run(ModelArtifact.from_onnx_file(mlp_model), context(tmp_path, MLP_X))
    assert initializer(out.path, "w1_scale").shape == (32,)  # one scale per output column
    assert initializer(out.path, "w1_quantized").dtype == np.uint8
    kept = node(out.path, "fc2")  # excluded: still a float MatMul on the float weight
    assert kept.op_type == "MatMul" and kept.input[1] == "w2"
    assert ops(out.path)["MatMulInteger"] == 1
    assert cosine(run(mlp_model, {"x": MLP_X}), run(out.path, {"x": MLP_X})) > 0.99


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_qdq_for_each_calibration_method(cnn_model: Path, tmp_path: Path, method: str) -> None:
    ctx = context(tmp_path, CNN_X)
    out = registry.build("int8_static", {"calibration": method}).run(ModelArtifact.from_onnx_file(cnn_model), ctx)
    counts = ops(out.path)
    assert counts["QuantizeLinear"] >= 3 and counts["DequantizeLinear"] >= 6
    conv_inputs = [producers(out.path).get(i) for i in node(out.path, "/0/Conv").input[:2]]
    assert all(p is not None and p.op_type == "DequantizeLinear" for p in conv_inputs)
    assert ctx.details["calibration"] == method and ctx.details["preprocessed"] is True
    assert ctx.details["calibration_samples"] == 40
    assert cosine(run(cnn_model, {"x": CNN_X}), run(out.path, {"x": CNN_X})) > 0.99


def test_entropy_calibration_picks_other_ranges_than_minmax(cnn_model: Path, tmp_path: Path) -> None:
    model = ModelArtifact.from_onnx_file(cnn_model)
    scales = {}
    for method in ("minmax", "entropy"):
        out = registry.build("int8_static", {"calibration": method}).run(model, context(tmp_path, CNN_X))
        scales[method] = float(initializer(out.path, "/2/Relu_output_0_scale"))
    assert scales["entropy"] < scales["minmax"]  # KL search clips the long tail min-max keeps


def test_static_per_channel_gives_per_axis_scales(cnn_model: Path, tmp_path: Path) -> None:
    model = ModelArtifact.from_onnx_file(cnn_model)
    per_channel = registry.build("int8_static").run(model, context(tmp_path, CNN_X))
    per_tensor = registry.build("int8_static", {"per_channel": False}).run(model, context(tmp_path, CNN_X))
    weight = node(per_channel.path, "/3/Conv").input[1]
    dq = producers(per_channel.path)[weight]
    assert initializer(per_channel.path, dq.input[1]).shape == (8,)  # 8 output channels
    assert any(a.name == "axis" for a in dq.attribute)
    dq = producers(per_tensor.path)[node(per_tensor.path, "/3/Conv").input[1]]
    assert initializer(per_tensor.path, dq.input[1]).size == 1


def test_static_excluded_node_stays_float(cnn_model: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path, CNN_X)
    out = registry.build("int8_static", {"nodes_to_exclude": ["/7/Gemm"]}).run(
        ModelArtifact.from_onnx_file(cnn_model), ctx
    )
    made_by = producers(out.path)
    gemm = node(out.path, "/7/Gemm")
    # Its weight and bias stay float32 initializers (its input may still be the dequantized output
    # of the quantized Flatten before it: QDQ quantizes tensors, and that one is shared).
    assert gemm.input[1] not in made_by and gemm.input[2] not in made_by
    assert initializer(out.path, gemm.input[1]).dtype == np.float32
    assert initializer(out.path, gemm.input[2]).dtype == np.float32
    assert made_by[node(out.path, "/3/Conv").input[1]].op_type == "DequantizeLinear"
    assert ctx.details["nodes_excluded"] == ["/7/Gemm"] and "nodes_not_found" not in ctx.details
    assert cosine(run(cnn_model, {"x": CNN_X}), run(out.path, {"x": CNN_X})) > 0.99


def fixed_batch_mlp(source: Path, target: Path, batch: int) -> Path:
    """``source`` with its batch axis fixed to ``batch``."""
    model = onnx.load(str(source))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(target))
    return target


def test_static_reports_excluded_names_the_graph_lacks(mlp_model: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path, MLP_X)
    out = registry.build("int8_static", {"nodes_to_exclude": ["fc1"]}).run(ModelArtifact.from_onnx_file(mlp_model), ctx)
    assert ctx.details["nodes_not_found"] == ["fc1"]  # pre-processing fused it into fc1/MatMulAddFusion
    assert ops(out.path)["QuantizeLinear"] >= 1


def test_static_feeds_a_fixed_batch_model_its_batch_size(mlp_model: Path, tmp_path: Path) -> None:
    fixed = ModelArtifact.from_onnx_file(fixed_batch_mlp(mlp_model, tmp_path / "fixed.onnx", 4))
    feeds = model_feeds(SampleData({"x": MLP_X[:10]}), fixed, batch_size=16)
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 4]
    ctx = context(tmp_path, MLP_X[:10])
    out = registry.build("int8_static", {"calibration_batch_size": 16}).run(fixed, ctx)
    assert ctx.details["calibration_batches"] == 3
    assert ops(out.path)["QuantizeLinear"] >= 1
    assert cosine(run(fixed.path, {"x": MLP_X[:4]}), run(out.path, {"x": MLP_X[:4]})) > 0.99


def test_model_feeds_respects_limits_and_equal_sizes(mlp_model: Path) -> None:
    model = ModelArtifact.from_onnx_file(mlp_model)
    data = SampleData({"x": MLP_X})
    assert [f["x"].shape[0] for f in model_feeds(data, model, 16, max_samples=36)] == [16, 16, 4]
    assert [f["x"].shape[0] for f in model_feeds(data, model, 16, 36, equal_size=True)] == [16, 16, 16]
    assert [f["x"].shape[0] for f in model_feeds(data, model, 64)] == [40]
    with pytest.raises(PassFailed):
        model_feeds(SampleData({"x": MLP_X[:0]}), model, 16)


def test_static_leaves_no_scratch_files(mlp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.chdir(tmp_path)
    ctx = context(tmp_path, MLP_X)
    out = registry.build("int8_static", {"calibration": "entropy"}).run(ModelArtifact.from_onnx_file(mlp_model), ctx)
    assert sorted(p.name for p in ctx.work_dir.iterdir()) == [out.path.name]
    assert list(system_tmp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "system-tmp", "work"]


def test_static_calibration_needs_no_system_temp_folder(
    mlp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # quantize_static would calibrate in a TemporaryDirectory of the system temp folder; ours
    # calibrates in the work dir, so it works even where the temp folder cannot be written.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    ctx = context(tmp_path, MLP_X)
    out = registry.build("int8_static").run(ModelArtifact.from_onnx_file(mlp_model), ctx)
    assert ops(out.path)["QuantizeLinear"] >= 1
    assert ctx.details["calibration_batches"] == 3
    assert sorted(p.name for p in ctx.work_dir.iterdir()) == [out.path.name]


def test_static_falls_back_to_the_raw_model_when_preprocessing_fails(
    mlp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization as ortq

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("injected pre-processing fault")

    monkeypatch.setattr(ortq, "quant_pre_process", broken)
    ctx = context(tmp_path, MLP_X)
    out = registry.build("int8_static").run(ModelArtifact.from_onnx_file(mlp_model), ctx)
    assert ctx.details["preprocessed"] is False
    assert "injected pre-processing fault" in ctx.details["preprocess_note"]
    assert node(out.path, "fc1").op_type == "MatMul"  # not fused into Gemm: the raw graph was used
    assert ops(out.path)["QuantizeLinear"] >= 1


def relu_only(path: Path) -> Path:
    """A model with nothing to quantize dynamically."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_nothing_to_quantize_is_a_pass_failure(tmp_path: Path) -> None:
    model = ModelArtifact.from_onnx_file(relu_only(tmp_path / "relu.onnx"))
    ctx = context(tmp_path, MLP_X)
    with pytest.raises(PassFailed, match=r"^int8_dynamic: no operator") as info:
        registry.build("int8_dynamic").run(model, ctx)
    assert "\n" not in str(info.value)
    assert list(ctx.work_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("int8_dynamic", {"per_chanel": True}),
        ("int8_dynamic", {"weight_type": "int4"}),
        ("int8_static", {"calibration": "kl"}),
        ("int8_static", {"activation_type": "qint8", "weight_type": "quint8"}),
        ("int8_static", {"calibration_batch_size": 0}),
    ],
)
def test_registry_refuses_bad_configs(name: str, config: dict[str, object]) -> None:
    with pytest.raises(InvalidConfig, match=name):
        registry.build(name, config)


def test_configs_round_trip_through_the_registry() -> None:
    built = registry.build("int8_static", {"op_types": ["Conv"], "nodes_to_exclude": ["a"]})
    described = registry.describe(built)
    assert described["config"]["op_types"] == ["Conv"]
    assert registry.build("int8_static", described["config"]).config == built.config
