"""The session factory: providers, options, and translated load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer.errors import InvalidConfig, InvalidModel
from optimizer.runtime import RuntimeOptions, create_session, cuda_available, resolve_device, select_providers


def test_cpu_session_runs_the_model(mlp_model: Path) -> None:
    session = create_session(mlp_model, RuntimeOptions(device="cpu", intra_op_threads=1))
    (logits,) = session.run(None, {"x": np.ones((3, 16), np.float32)})
    assert logits.shape == (3, 4)
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_cpu_is_always_the_last_provider() -> None:
    assert select_providers(RuntimeOptions(device="cpu")) == ["CPUExecutionProvider"]
    assert select_providers(RuntimeOptions(device="auto"))[-1] == "CPUExecutionProvider"


@pytest.mark.skipif(cuda_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_is_refused() -> None:
    assert resolve_device("auto") == "cpu"
    with pytest.raises(InvalidConfig, match="no CUDA provider"):
        resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_session_uses_the_gpu(mlp_model: Path) -> None:
    session = create_session(mlp_model, RuntimeOptions(device="cuda"))
    assert session.get_providers()[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    (logits,) = session.run(None, {"x": np.ones((3, 16), np.float32)})
    assert logits.shape == (3, 4)


def test_garbage_becomes_invalid_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InvalidModel, match="ONNX Runtime cannot load the model"):
        create_session(bad)
