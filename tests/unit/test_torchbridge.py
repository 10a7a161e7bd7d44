"""ONNX <-> torch bridge: real onnx2torch, real torch export, real ONNX Runtime on a tiny MobileNet-like CNN."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optimizer.errors import ConversionFailed, PassFailed
from optimizer.torchbridge import export_onnx, import_onnx2torch, onnx_to_torch, verify_onnx
from tests.builders import mobilenet_like_onnx, random_images


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mobilenet_like_onnx(tmp_path_factory.mktemp("mobilenet") / "mobilenet.onnx")


def test_onnx_to_torch_matches_onnx_runtime(mobilenet: Path) -> None:
    import torch

    sample = {"image": random_images(4)}
    module = onnx_to_torch(mobilenet, sample)
    assert isinstance(module, torch.fx.GraphModule)
    assert not module.training
    want = ort.InferenceSession(str(mobilenet), providers=["CPUExecutionProvider"]).run(None, sample)[0]
    with torch.no_grad():
        got = module(torch.from_numpy(sample["image"])).numpy()
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and sum(c.groups > 1 for c in convs) == 2  # depthwise convs survive as grouped convs


def test_export_round_trip_keeps_names_and_dynamic_batch(mobilenet: Path, tmp_path: Path) -> None:
    import torch

    module = onnx_to_torch(mobilenet)
    out = export_onnx(
        module,
        {"image": random_images(4)},
        tmp_path / "out.onnx",
        input_names=["image"],
        output_names=["scores"],
        opset=17,
    )
    proto = onnx.load(str(out))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["scores"]
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(mobilenet), providers=["CPUExecutionProvider"])
    for rows in (1, 5):
        batch = random_images(rows, seed=rows)
        got = session.run(None, {"image": batch})[0]
        assert got.shape == (rows, 10)
        with torch.no_grad():
            np.testing.assert_allclose(got, module(torch.from_numpy(batch)).numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(got, original.run(None, {"image": batch})[0], rtol=1e-3, atol=1e-4)
    assert verify_onnx(module, out, {"image": random_images(5)}) < 1e-4


def test_export_clamps_the_opset(mobilenet: Path, tmp_path: Path) -> None:
    module = onnx_to_torch(mobilenet)
    out = export_onnx(
        module,
        {"image": random_images(2)},
        tmp_path / "o.onnx",
        input_names=["image"],
        output_names=["scores"],
        opset=11,
    )
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {13}


def test_verify_onnx_catches_a_changed_weight(mobilenet: Path, tmp_path: Path) -> None:
    import torch

    module = onnx_to_torch(mobilenet)
    sample = {"image": random_images(4)}
    out = export_onnx(module, sample, tmp_path / "out.onnx", input_names=["image"], output_names=["scores"], opset=17)
    assert verify_onnx(module, out, sample) < 1e-4
    classifier = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        classifier.bias[0] += 0.5  # one weight: every sample's score 0 moves
    with pytest.raises(PassFailed, match="differs from the torch model"):
        verify_onnx(module, out, sample)


def test_export_wrong_input_name_is_refused(mobilenet: Path, tmp_path: Path) -> None:
    from optimizer.errors import InvalidData

    module = onnx_to_torch(mobilenet)
    with pytest.raises(InvalidData, match="lacks the input"):
        export_onnx(
            module, {"x": random_images(2)}, tmp_path / "o.onnx", input_names=["image"], output_names=["s"], opset=17
        )
    assert not (tmp_path / "o.onnx").exists()


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("GreaterOrEqual", ["x", "y"], ["z"])],
        "ge",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.BOOL, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "ge.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ConversionFailed) as caught:
        onnx_to_torch(path)
    assert str(caught.value) == "onnx2torch cannot convert GreaterOrEqual (opset 16)"


def _placeholder_left() -> bool:
    module = sys.modules.get("torchvision")
    return module is not None and getattr(module, "__spec__", None) is None


def test_onnx2torch_imports_and_no_placeholder_lingers() -> None:
    import importlib.util

    onnx2torch = import_onnx2torch()
    assert callable(onnx2torch.convert)
    assert not _placeholder_left()
    importlib.util.find_spec("torchvision")  # what transformers probes: must not raise


def test_a_broken_torchvision_is_replaced_while_onnx2torch_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "onnx2torch" or n.startswith("onnx2torch.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setitem(sys.modules, "torchvision", None)  # fault: importing it now raises ImportError
    onnx2torch = import_onnx2torch()
    assert callable(onnx2torch.convert)
    assert "torchvision" not in sys.modules  # the placeholder was removed again
    from onnx2torch.node_converters import nms

    with pytest.raises(RuntimeError, match="torchvision is not usable here"):
        nms.torchvision.ops.nms(None, None, 0.5)


def test_identity_fed_initializers_are_folded_first(tmp_path: Path) -> None:
    """The torch exporter feeds de-duplicated initializers through Identity nodes; onnx2torch alone cannot read them."""
    import torch
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["b2"]), helper.make_node("Conv", ["x", "w", "b2"], ["y"], pads=[1] * 4)],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "conv.onnx"
    onnx.save(model, str(path))
    sample = {"x": rng.normal(size=(3, 3, 8, 8)).astype(np.float32)}
    module = onnx_to_torch(path, sample)
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.bias is not None
    np.testing.assert_allclose(conv.bias.detach().numpy(), numpy_helper.to_array(bias))
