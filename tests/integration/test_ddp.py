"""DistributedDataParallel fine-tuning in processes fine_tune spawns itself (gloo on CPU, nccl on GPUs)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from optimizer.data import SampleData
from optimizer.errors import PassFailed
from optimizer.training import FinetuneConfig, fine_tune
from tests import builders

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch", reason="fine-tuning needs the torch extra")

pytestmark = pytest.mark.slow


def digits(train: int, val: int) -> tuple[SampleData, SampleData]:
    images, labels = builders.digits_8x8(seed=0)
    return (
        SampleData({"x": images[:train]}, labels[:train]),
        SampleData({"x": images[train : train + val]}, labels[train : train + val]),
    )


def mlp() -> Any:
    """No BatchNorm, no dropout: the 2-process run must match the 1-process run."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def max_weight_diff(a: Any, b: Any) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in pairs)


def test_two_gloo_processes_match_one_process() -> None:
    train, val = digits(512, 128)
    start = mlp()
    config = FinetuneConfig(epochs=3, optimizer="adam", lr=3e-3, batch_size=32, precision="fp32")
    single, single_report = fine_tune(copy.deepcopy(start), train, val, config, input_names=["x"], seed=1)
    config2 = config.model_copy(update={"workers": 2})
    double, double_report = fine_tune(copy.deepcopy(start), train, val, config2, input_names=["x"], seed=1)
    assert single_report.devices == ["cpu"]
    assert double_report.devices == ["cpu x2 (gloo)"]
    assert max_weight_diff(start, double) > 0.01  # it really trained
    assert max_weight_diff(single, double) < 1e-4
    assert [h.epoch for h in double_report.history] == [1, 2, 3]
    for one, two in zip(single_report.history, double_report.history, strict=True):
        assert two.val_loss == pytest.approx(one.val_loss, abs=1e-4)
        assert two.val_accuracy == pytest.approx(one.val_accuracy, abs=1e-6)


def test_an_onnx2torch_graph_module_trains_in_two_processes(tmp_path: Path) -> None:
    if importlib.util.find_spec("optimizer.torchbridge") is None:
        pytest.skip("optimizer.torchbridge is not there yet: cannot build an onnx2torch module")
    from optimizer.torchbridge import onnx_to_torch

    model = onnx_to_torch(builders.mlp_onnx(tmp_path / "mlp.onnx"))
    assert isinstance(model, torch.fx.GraphModule)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 16)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)
    train, val = SampleData({"x": x[:64]}, labels[:64]), SampleData({"x": x[64:]}, labels[64:])
    before = copy.deepcopy(model)
    config = FinetuneConfig(epochs=2, lr=1e-2, batch_size=16, precision="fp32", workers=2)
    tuned, report = fine_tune(model, train, val, config, input_names=["x"])
    assert report.devices == ["cpu x2 (gloo)"]
    assert max_weight_diff(before, tuned) > 1e-3


class NaNModel(torch.nn.Module):
    """Picklable (module level) and diverging at once."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x: Any) -> Any:
        return self.linear(x.flatten(1)) * float("nan")


def test_divergence_in_the_workers_is_the_same_one_line_error() -> None:
    train, val = digits(64, 32)
    config = FinetuneConfig(epochs=2, precision="fp32", batch_size=16, workers=2)
    with pytest.raises(PassFailed, match=r"^training diverged: non-finite loss at epoch 1$"):
        fine_tune(NaNModel(), train, val, config, input_names=["x"])


def test_an_unpicklable_model_is_refused_before_spawning() -> None:
    class Local(torch.nn.Linear):
        pass

    train, val = digits(64, 32)
    config = FinetuneConfig(epochs=1, precision="fp32", batch_size=16, workers=2)
    with pytest.raises(PassFailed, match="workers=2 needs a picklable model"):
        fine_tune(torch.nn.Sequential(torch.nn.Flatten(), Local(64, 10)), train, val, config, input_names=["x"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_multi_gpu_ddp_matches_one_gpu() -> None:
    train, val = digits(512, 128)
    start = mlp()
    config = FinetuneConfig(epochs=2, optimizer="sgd", lr=0.05, batch_size=32, precision="fp32")
    single, _ = fine_tune(copy.deepcopy(start), train, val, config, input_names=["x"], device="cuda")
    auto = config.model_copy(update={"workers": "auto"})
    multi, report = fine_tune(copy.deepcopy(start), train, val, auto, input_names=["x"], device="cuda")
    assert report.devices == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert max_weight_diff(single, multi) < 1e-3
