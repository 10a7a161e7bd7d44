"""The fp16 pass: float16 weights and compute with float32 inputs/outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.errors import InvalidConfig
from optimizer.passes import registry
from optimizer.passes.base import PassContext

X = np.random.default_rng(5).normal(size=(8, 16)).astype(np.float32)


def context(tmp_path: Path, device: str = "cpu") -> PassContext:
    """A pass context on ``device``."""
    return PassContext(work_dir=tmp_path / "work", calibration=SampleData({"x": X}), device=device)


def run(path: Path, providers: list[str]) -> np.ndarray:
    """The first output of ``path`` on ``X``."""
    return ort.InferenceSession(str(path), providers=providers).run(None, {"x": X})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-sample cosine similarity."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def elem_types(values: object) -> set[int]:
    """Element types of a sequence of ValueInfoProto."""
    return {v.type.tensor_type.elem_type for v in values}  # type: ignore[attr-defined]


def test_skipped_without_cuda(mlp_model: Path, tmp_path: Path) -> None:
    fp16 = registry.build("fp16")
    model = ModelArtifact.from_onnx_file(mlp_model)
    assert fp16.skip_reason(model, context(tmp_path, "cpu")) == "fp16 is only offered on a CUDA GPU"
    assert fp16.skip_reason(model, context(tmp_path, "cuda")) is None


def test_weights_become_float16_while_io_stays_float32(mlp_model: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path)
    out = registry.build("fp16").run(ModelArtifact.from_onnx_file(mlp_model), ctx)
    model = onnx.load(str(out.path))
    assert {init.data_type for init in model.graph.initializer} == {TensorProto.FLOAT16}
    assert elem_types(model.graph.input) == {TensorProto.FLOAT}
    assert elem_types(model.graph.output) == {TensorProto.FLOAT}
    assert ctx.details["float16_initializers"] == 4 and ctx.details["float32_initializers"] == 0
    assert out.size_bytes < ModelArtifact.from_onnx_file(mlp_model).size_bytes
    # ONNX Runtime's CPU provider can run this small float16 graph, so its outputs are checked here.
    cpu = ["CPUExecutionProvider"]
    assert cosine(run(mlp_model, cpu), run(out.path, cpu)) > 0.999


def test_blocked_op_types_stay_float32(mlp_model: Path, tmp_path: Path) -> None:
    out = registry.build("fp16", {"op_block_list": ["Relu"]}).run(
        ModelArtifact.from_onnx_file(mlp_model), context(tmp_path)
    )
    graph = onnx.load(str(out.path)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    relu = next(n for n in graph.node if n.op_type == "Relu")
    cast = made_by[relu.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT


def test_keep_io_types_off_makes_io_float16(mlp_model: Path, tmp_path: Path) -> None:
    out = registry.build("fp16", {"keep_io_types": False}).run(
        ModelArtifact.from_onnx_file(mlp_model), context(tmp_path)
    )
    assert out.inputs[0].dtype == "float16" and out.outputs[0].dtype == "float16"


@pytest.mark.gpu
def test_runs_on_cuda_close_to_float32(mlp_model: Path, tmp_path: Path) -> None:
    out = registry.build("fp16").run(ModelArtifact.from_onnx_file(mlp_model), context(tmp_path, "cuda"))
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cosine(run(mlp_model, ["CPUExecutionProvider"]), run(out.path, cuda)) > 0.999


@pytest.mark.parametrize("config", [{"keep_io": True}, {"op_block_list": "Relu"}])
def test_registry_refuses_bad_configs(config: dict[str, object]) -> None:
    with pytest.raises(InvalidConfig, match="fp16"):
        registry.build("fp16", config)
