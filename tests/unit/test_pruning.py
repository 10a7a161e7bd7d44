"""Structured (Torch-Pruning) and unstructured pruning on a tiny MobileNet-like CNN, checked with ONNX Runtime."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optimizer.errors import InvalidConfig
from optimizer.pruning import Importance, PruneInfo, prune_structured, prune_unstructured
from optimizer.torchbridge import export_onnx, onnx_to_torch, verify_onnx
from tests.builders import mobilenet_like_onnx, random_images

if TYPE_CHECKING:
    import torch

NAMES = {"input_names": ["image"], "output_names": ["scores"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    path = mobilenet_like_onnx(tmp_path_factory.mktemp("mobilenet") / "mobilenet.onnx")
    return onnx_to_torch(path, {"image": random_images(4)})


@pytest.fixture
def module(converted: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(converted)


def conv_widths(path: Path) -> list[tuple[int, int]]:
    """(output channels, group count) of every Conv in an ONNX file, read from its weight initializers."""
    proto = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    widths = []
    for node in proto.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            widths.append((weights[node.input[1]].shape[0], group))
    return widths


def gemm_width(path: Path) -> int:
    proto = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    (gemm,) = [n for n in proto.graph.node if n.op_type == "Gemm"]
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    shape = weights[gemm.input[1]].shape
    return int(shape[0] if trans_b else shape[1])


def test_structured_magnitude_halves_channels(module: torch.nn.Module, tmp_path: Path) -> None:
    sample = {"image": random_images(8)}
    before = export_onnx(module, sample, tmp_path / "before.onnx", opset=17, **NAMES)
    info = prune_structured(module, sample, ratio=0.5, input_names=["image"])
    assert isinstance(info, PruneInfo) and info.method == "structured" and info.importance == "magnitude"
    after = export_onnx(module, sample, tmp_path / "after.onnx", opset=17, **NAMES)
    old, new = conv_widths(before), conv_widths(after)
    assert [w for w, _ in old] == [24, 24, 32, 32, 64]
    assert len(new) == len(old)
    assert all(n < o for (n, _), (o, _) in zip(new, old, strict=True))
    assert all(n % 8 == 0 for n, _ in new)
    assert new[0][0] == 8  # 24 * 0.5 = 12 channels, rounded down to a multiple of 8
    assert [g > 1 for _, g in new] == [False, True, False, True, False]  # still depthwise
    assert gemm_width(after) == gemm_width(before) == 10  # the classifier keeps its output width
    assert verify_onnx(module, after, {"image": random_images(6, seed=3)}) < 1e-4
    assert info.params_after < info.params_before / 2
    assert info.macs_before and info.macs_after and info.macs_after < info.macs_before
    assert info.channels_before == 24 + 24 + 32 + 32 + 64 + 10
    assert info.channels_after == sum(w for w, _ in new) + 10
    assert info.sparsity is None and info.ratio == 0.5


def test_structured_without_rounding_keeps_half(module: torch.nn.Module) -> None:
    import torch

    prune_structured(module, {"image": random_images(2)}, ratio=0.5, round_to=None, input_names=["image"])
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 12, 16, 16, 32]


@pytest.mark.parametrize("importance", ["taylor", "lamp"])
def test_other_importances_prune_and_export(importance: Importance, module: torch.nn.Module, tmp_path: Path) -> None:
    import torch

    batch = torch.from_numpy(random_images(8, seed=5))
    labels = torch.arange(8) % 10

    def loss_fn(model: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch), labels)

    sample = {"image": random_images(4)}
    info = prune_structured(module, sample, ratio=0.5, importance=importance, loss_fn=loss_fn, input_names=["image"])
    assert info.importance == importance and info.params_after < info.params_before
    assert all(p.grad is None for p in module.parameters())
    out = export_onnx(module, sample, tmp_path / "p.onnx", opset=17, **NAMES)
    assert all(w % 8 == 0 for w, _ in conv_widths(out)) and gemm_width(out) == 10
    verify_onnx(module, out, sample)


def test_taylor_needs_a_loss(module: torch.nn.Module) -> None:
    with pytest.raises(InvalidConfig, match="loss function"):
        prune_structured(module, {"image": random_images(2)}, ratio=0.5, importance="taylor", input_names=["image"])


def test_unstructured_zeroes_half_the_weights(module: torch.nn.Module, tmp_path: Path) -> None:
    import torch

    layers = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    shapes = [tuple(m.weight.shape) for m in layers]
    info = prune_unstructured(module, amount=0.5)
    assert [tuple(m.weight.shape) for m in layers] == shapes
    zeros = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
    assert zeros == pytest.approx(0.5, abs=0.01)
    assert info.sparsity == pytest.approx(zeros)
    assert info.params_after == info.params_before and info.method == "unstructured"
    assert not any(name.endswith("_mask") for name, _ in module.named_buffers())
    sample = {"image": random_images(4)}
    out = export_onnx(module, sample, tmp_path / "u.onnx", opset=17, **NAMES)
    verify_onnx(module, out, sample)
    stored = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.dims and len(t.dims) > 1]
    assert sum(int((w == 0).sum()) for w in stored) / sum(w.size for w in stored) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.5, -0.2, float("nan")])
def test_ratio_outside_zero_one_is_refused(ratio: float, module: torch.nn.Module) -> None:
    with pytest.raises(InvalidConfig, match="between 0 and 1"):
        prune_structured(module, {"image": random_images(2)}, ratio=ratio, input_names=["image"])
    with pytest.raises(InvalidConfig, match="between 0 and 1"):
        prune_unstructured(module, amount=ratio)


def test_bad_round_to_is_refused(module: torch.nn.Module) -> None:
    with pytest.raises(InvalidConfig, match="round_to"):
        prune_structured(module, {"image": random_images(2)}, ratio=0.5, round_to=0, input_names=["image"])


def test_conv_head_keeps_its_width(tmp_path: Path) -> None:
    """A fully convolutional classifier: the last 1x1 conv feeds the output through pooling only."""
    import torch
    from torch import nn

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip
    sample = {"image": random_images(4)}
    info = prune_structured(model, sample, ratio=0.5, input_names=["image"])
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [8, 8, 6]
    assert info.channels_after == 22 and not model.training
    out = export_onnx(model, sample, tmp_path / "head.onnx", opset=17, **NAMES)
    assert verify_onnx(model, out, sample) < 1e-4
    assert np.asarray(model(torch.from_numpy(random_images(3))).detach()).shape == (3, 6)


def conv_out(module: torch.nn.Module) -> list[int]:
    import torch

    return [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_gradual_pruning_reaches_the_ratio_in_steps(
    module: torch.nn.Module, converted: torch.nn.Module, tmp_path: Path
) -> None:
    """Three steps to 50%: ``between`` sees the widths shrink step by step; the end matches one step."""
    import torch

    sample = {"image": random_images(4)}
    seen: list[tuple[int, list[int]]] = []

    def between(step: int) -> None:
        seen.append((step, conv_out(module)))
        with torch.no_grad():  # what training would do: the weights change between the steps
            for parameter in module.parameters():
                parameter.mul_(1.01)

    info = prune_structured(module, sample, ratio=0.5, round_to=None, steps=3, between=between, input_names=["image"])
    once = copy.deepcopy(converted)
    prune_structured(once, sample, ratio=0.5, round_to=None, input_names=["image"])
    original = conv_out(converted)
    assert [step for step, _ in seen] == [1, 2]  # not after the last step
    widths = [original, seen[0][1], seen[1][1], conv_out(module)]
    assert all(all(b < a for a, b in zip(w0, w1, strict=True)) for w0, w1 in itertools.pairwise(widths))
    assert conv_out(module) == conv_out(once) == [12, 12, 16, 16, 32]
    assert info.steps == 3 and info.channels_after == sum(conv_out(module)) + 10
    out = export_onnx(module, sample, tmp_path / "gradual.onnx", opset=17, **NAMES)
    assert gemm_width(out) == 10
    assert verify_onnx(module, out, {"image": random_images(6, seed=3)}) < 1e-4


def test_global_pruning_caps_each_layer(module: torch.nn.Module, converted: torch.nn.Module) -> None:
    sample = {"image": random_images(4)}
    info = prune_structured(
        module, sample, ratio=0.5, round_to=None, global_pruning=True, max_layer_ratio=0.75, input_names=["image"]
    )
    before, after = conv_out(converted), conv_out(module)
    assert info.global_pruning and info.params_after < info.params_before
    assert all(a >= b * 0.25 for a, b in zip(after, before, strict=True))
    assert after != [12, 12, 16, 16, 32]  # not the per-layer result: channels were ranked across layers


@pytest.mark.parametrize(("options", "match"), [({"steps": 0}, "steps"), ({"max_layer_ratio": 0.3}, "at least")])
def test_bad_gradual_options_are_refused(options: dict[str, float], match: str, module: torch.nn.Module) -> None:
    with pytest.raises(InvalidConfig, match=match):
        prune_structured(module, {"image": random_images(2)}, ratio=0.5, input_names=["image"], **options)  # type: ignore[arg-type]
