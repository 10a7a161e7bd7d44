"""Tiny real models and data for tests, built in code (no downloaded weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_onnx(
    path: Path,
    in_features: int = 16,
    hidden: int = 32,
    classes: int = 4,
    seed: int = 0,
    opset: int = 17,
) -> Path:
    """x[batch, in] -> MatMul/Add/Relu -> MatMul/Add -> logits[batch, classes], dynamic batch."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (in_features, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (hidden,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (hidden, classes)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (classes,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["logits"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_data(
    path: Path, samples: int = 64, in_features: int = 16, classes: int = 4, seed: int = 1, labels: bool = True
) -> Path:
    """Random inputs for :func:`mlp_onnx`, optionally with integer labels."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"x": rng.normal(size=(samples, in_features)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, classes, size=samples).astype(np.int64)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def cnn_onnx(path: Path, seed: int = 0, channels: int = 8, classes: int = 10, size: int = 8) -> Path:
    """A tiny Conv/BN/ReLU/Linear CNN exported from torch: input ``x[batch, 1, size, size]``."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1),
        torch.nn.BatchNorm2d(channels),
        torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(channels * 4, classes),
    ).eval()
    return export_image_classifier(model, torch.randn(2, 1, size, size), path)


def export_image_classifier(model: Any, example: Any, path: Path) -> Path:
    """``torch.onnx.export`` with input ``x``, output ``logits``, a dynamic batch axis, opset 17."""
    import torch

    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    return path


def digits_8x8(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (no download) as float32 ``[N, 1, 8, 8]`` in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order], digits.target.astype(np.int64)[order]


def trained_digits_cnn(model_path: Path, data_path: Path, epochs: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Train :func:`cnn_onnx`'s architecture on real digits for a few seconds; write ONNX and held-out .npz."""
    import torch

    torch.manual_seed(seed)
    images, labels = digits_8x8(seed)
    train_x, test_x = torch.from_numpy(images[:1400]), images[1400:]
    train_y, test_y = torch.from_numpy(labels[:1400]), labels[1400:]
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for start in range(0, len(train_x), 64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(train_x[start : start + 64]), train_y[start : start + 64])
            loss.backward()
            optimizer.step()
    model.eval()
    export_image_classifier(model, train_x[:2], model_path)
    np.savez(data_path, x=test_x, labels=test_y)
    return model_path, data_path


def mobilenet_like_onnx(path: Path, seed: int = 0) -> Path:
    """Stem conv+BN+ReLU6, two depthwise-separable blocks, GAP, Linear; input ``image``, output ``scores``."""
    import torch
    from torch import nn

    def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
        )  # fmt: skip

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
        separable(24, 32, 1), separable(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():  # non-trivial BN statistics, so the fused graph really differs from the raw convs
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.2, 0.2)
    torch.onnx.export(
        model, (torch.randn(2, 3, 16, 16),), str(path), input_names=["image"], output_names=["scores"],
        dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


def random_images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 3, 16, 16)).astype(np.float32)
