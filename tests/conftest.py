"""Shared fixtures: tiny real models and data built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import builders

# As in the sandbox child: OpenMP threads wait without spinning, so the in-process training tests
# get their fair share of a busy machine instead of a sixth of it (read when torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests honestly when no CUDA device is usable."""
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:  # pragma: no cover - onnxruntime is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: onnxruntime offers no CUDAExecutionProvider here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mlp_model(tmp_path: Path) -> Path:
    """A tiny MatMul MLP: input ``x[batch, 16]``, output ``logits[batch, 4]``."""
    return builders.mlp_onnx(tmp_path / "mlp.onnx")


@pytest.fixture
def mlp_samples(tmp_path: Path) -> Path:
    """64 samples for ``mlp_model`` with integer labels."""
    return builders.mlp_data(tmp_path / "mlp.npz")


@pytest.fixture(scope="session")
def cnn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN exported from torch: input ``x[batch, 1, 8, 8]``, output ``logits[batch, 10]``."""
    return builders.cnn_onnx(tmp_path_factory.mktemp("cnn") / "cnn.onnx")
