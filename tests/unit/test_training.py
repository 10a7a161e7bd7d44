"""fine_tune on real digits with real torch: losses, early stopping, search, precision, failures."""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from optimizer.data import SampleData
from optimizer.errors import InvalidConfig, PassFailed
from optimizer.training import FinetuneConfig, TrainingReport, fine_tune
from tests import builders

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch", reason="fine-tuning needs the torch extra")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, [N, 1, 8, 8] float32 and int64 labels, shuffled."""
    return builders.digits_8x8(seed=0)


def split(digits: tuple[np.ndarray, np.ndarray], train: int, val: int) -> tuple[SampleData, SampleData]:
    images, labels = digits
    return (
        SampleData({"x": images[:train]}, labels[:train]),
        SampleData({"x": images[train : train + val]}, labels[train : train + val]),
    )


def mlp(hidden: int = 32, outputs: int = 10, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)
    )


def val_loss(module: Any, data: SampleData) -> float:
    """Cross-entropy (integer labels) or MSE (float labels) of ``module`` on ``data``, computed here."""
    module.eval()
    with torch.no_grad():
        out = module(torch.from_numpy(data.inputs["x"]))
    assert data.labels is not None
    target = torch.from_numpy(data.labels)
    if data.labels.dtype.kind == "f":
        return float(torch.nn.functional.mse_loss(out.reshape(target.shape), target))
    return float(torch.nn.functional.cross_entropy(out, target))


@pytest.fixture(scope="module")
def overfit_run(digits: tuple[np.ndarray, np.ndarray]) -> tuple[Any, Any, TrainingReport, SampleData]:
    """A wide MLP on 60 training samples with a high lr: val loss falls, then rises (overfits)."""
    train, val = split(digits, 60, 400)
    start = mlp(hidden=128)
    config = FinetuneConfig(epochs=60, lr=0.02, batch_size=16, patience=2, precision="fp32")
    tuned, report = fine_tune(copy.deepcopy(start), train, val, config, input_names=["x"])
    return start, tuned, report, val


def test_fine_tune_lowers_val_loss_and_restores_the_best_epoch(overfit_run: Any) -> None:
    start, tuned, report, val = overfit_run
    assert val_loss(tuned, val) < val_loss(start, val) - 0.5
    best = report.history[report.best_epoch - 1]
    assert best.val_loss == min(h.val_loss for h in report.history)
    assert report.restored_best
    assert report.best_epoch < report.history[-1].epoch
    # The returned weights are the best epoch's, not the last epoch's.
    assert val_loss(tuned, val) == pytest.approx(best.val_loss, abs=1e-5)
    assert val_loss(tuned, val) < report.history[-1].val_loss - 1e-4
    assert report.loss == "cross_entropy"
    assert best.val_accuracy is not None and best.val_accuracy > 0.5
    assert report.devices == ["cpu"]
    assert report.precision == "fp32"


def test_early_stopping_stops_before_the_epoch_limit(overfit_run: Any) -> None:
    _, _, report, _ = overfit_run
    assert report.stopped_epoch is not None
    assert report.stopped_epoch == report.best_epoch + 2  # patience 2
    assert len(report.history) == report.stopped_epoch < 60
    assert [h.epoch for h in report.history] == list(range(1, len(report.history) + 1))
    assert len(report.trials) == 1
    assert report.trials[0].epochs_run == len(report.history)


def test_float_labels_train_with_mse(digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = digits
    targets = (labels / 9.0).astype(np.float32)
    train = SampleData({"x": images[:300]}, targets[:300])
    val = SampleData({"x": images[300:500]}, targets[300:500])
    start = mlp(outputs=1)
    config = FinetuneConfig(epochs=8, lr=0.01, batch_size=32, precision="fp32")
    tuned, report = fine_tune(copy.deepcopy(start), train, val, config, input_names=["x"])
    assert report.loss == "mse"
    assert all(h.val_accuracy is None for h in report.history)
    assert val_loss(tuned, val) < 0.5 * val_loss(start, val)


def test_distillation_from_a_teacher_without_labels(digits: tuple[np.ndarray, np.ndarray]) -> None:
    images = digits[0]
    teacher_model = mlp(seed=0)  # untrained, but a fixed function the student must learn to match
    calls: list[int] = []

    def teacher(feed: dict[str, np.ndarray]) -> np.ndarray:
        calls.append(len(feed["x"]))
        with torch.no_grad():
            return teacher_model(torch.from_numpy(feed["x"])).numpy()

    train = SampleData({"x": images[:400]})
    val = SampleData({"x": images[400:600]})
    student = mlp(seed=1)

    def agreement(module: Any) -> float:
        with torch.no_grad():
            x = torch.from_numpy(val.inputs["x"])
            return float((module(x).argmax(-1) == teacher_model(x).argmax(-1)).float().mean())

    before = agreement(student)
    config = FinetuneConfig(epochs=10, lr=0.01, batch_size=32, precision="fp32")
    tuned, report = fine_tune(student, train, val, config, input_names=["x"], teacher=teacher)
    assert report.loss == "distillation"
    assert len(report.history) >= 3
    assert report.history[report.best_epoch - 1].val_loss < report.history[0].val_loss
    assert agreement(tuned) > max(before + 0.2, 0.8)
    # Teacher outputs were computed once (one pass over train and val), not once per epoch.
    assert sum(calls) == 600


def test_labels_and_a_teacher_train_on_both(digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = digits
    teacher_model = mlp(seed=0)

    def teacher(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return teacher_model(torch.from_numpy(feed["x"])).numpy()

    train = SampleData({"x": images[:400]}, labels[:400])
    val = SampleData({"x": images[400:600]}, labels[400:600])
    config = FinetuneConfig(epochs=3, lr=0.01, batch_size=32, precision="fp32", reduce_lr_patience=None)
    _, both = fine_tune(mlp(seed=1), train, val, config, input_names=["x"], teacher=teacher)
    _, hard = fine_tune(mlp(seed=1), train, val, config, input_names=["x"])
    assert (both.loss, hard.loss) == ("cross_entropy+distillation", "cross_entropy")
    assert all(h.val_accuracy is not None for h in both.history)  # the labels still measure accuracy
    # The untrained teacher pulls the student away from the labels: the two runs differ.
    assert both.history[-1].val_loss != hard.history[-1].val_loss


def test_no_labels_and_no_teacher_is_refused(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train = SampleData({"x": digits[0][:50]})
    with pytest.raises(InvalidConfig, match="needs labels or a teacher"):
        fine_tune(mlp(), train, None, FinetuneConfig(epochs=1), input_names=["x"])


def test_monitoring_accuracy_without_classes_is_refused(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train = SampleData({"x": digits[0][:50]}, digits[1][:50].astype(np.float32))
    with pytest.raises(InvalidConfig, match="val_accuracy"):
        fine_tune(mlp(outputs=1), train, None, FinetuneConfig(monitor="val_accuracy"), input_names=["x"])


class NaNHead(torch.nn.Module):
    """A linear model whose output turns NaN: always, or only under autocast."""

    def __init__(self, only_under_autocast: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.only_under_autocast = only_under_autocast

    def forward(self, x: Any) -> Any:
        out = self.linear(x.flatten(1))
        if not self.only_under_autocast or torch.is_autocast_enabled("cpu"):
            out = out * float("nan")
        return out


def test_a_model_producing_nan_fails_as_diverged(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 64, 32)
    with pytest.raises(PassFailed, match="training diverged: non-finite loss at epoch 1"):
        fine_tune(NaNHead(False), train, val, FinetuneConfig(epochs=3, precision="fp32"), input_names=["x"])


def test_nan_under_bf16_restarts_in_fp32_from_the_starting_weights(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 64, 32)
    model = NaNHead(True)
    config = FinetuneConfig(epochs=2, precision="bf16", batch_size=16, lr=0.01)
    _, report = fine_tune(model, train, val, config, input_names=["x"])
    assert report.precision == "fp32"
    assert report.precision_note == "fell back to fp32: non-finite loss under bf16 at epoch 1"
    assert len(report.history) == 2
    assert all(np.isfinite(h.val_loss) for h in report.history)


def test_grid_search_records_every_trial_and_returns_the_best(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 200, 200)
    config = FinetuneConfig(
        epochs=4, search="grid", lr_choices=(1e-4, 3e-2), batch_choices=(16, 64), patience=1, precision="fp32"
    )
    tuned, report = fine_tune(mlp(), train, val, config, input_names=["x"])
    assert [(t.lr, t.batch_size) for t in report.trials] == [(1e-4, 16), (1e-4, 64), (3e-2, 16), (3e-2, 64)]
    winner = min(report.trials, key=lambda t: t.best_val_loss)
    assert (report.lr, report.batch_size) == (winner.lr, winner.batch_size) == (3e-2, 16)
    assert len({t.best_val_loss for t in report.trials}) == 4  # each trial really trained differently
    assert val_loss(tuned, val) == pytest.approx(winner.best_val_loss, abs=1e-5)
    assert report.history[report.best_epoch - 1].val_loss == winner.best_val_loss


def test_random_search_samples_lr_and_batch_from_the_choices(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 100, 100)
    config = FinetuneConfig(
        epochs=1, search="random", trials=3, lr_choices=(1e-4, 1e-2), batch_choices=(16, 32), precision="fp32"
    )
    _, report = fine_tune(mlp(), train, val, config, input_names=["x"], seed=3)
    _, again = fine_tune(mlp(), train, val, config, input_names=["x"], seed=3)
    assert len(report.trials) == 3
    assert all(1e-4 <= t.lr <= 1e-2 and t.batch_size in (16, 32) for t in report.trials)
    assert len({t.lr for t in report.trials}) == 3
    assert [(t.lr, t.batch_size) for t in report.trials] == [(t.lr, t.batch_size) for t in again.trials]


def test_a_deadline_too_small_for_one_epoch_fails(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 400, 100)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PassFailed, match=r"the time budget is too small for one epoch \(needs ~"):
        fine_tune(model, train, val, FinetuneConfig(precision="fp32"), input_names=["x"], deadline=time.monotonic())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_without_val_a_seeded_fraction_is_split_off(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, _ = split(digits, 100, 0)
    config = FinetuneConfig(epochs=2, precision="fp32", val_fraction=0.25, batch_size=25)
    _, first = fine_tune(mlp(), train, None, config, input_names=["x"])
    _, second = fine_tune(mlp(), train, None, config, input_names=["x"])
    assert first.history[0].val_loss == second.history[0].val_loss
    assert first.history[0].val_accuracy is not None
    # 25 of 100 samples are held out: accuracy is a multiple of 1/25.
    assert (first.history[0].val_accuracy * 25) == pytest.approx(round(first.history[0].val_accuracy * 25))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU precision choice")
def test_auto_precision_on_cpu_is_measured_and_explained(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 128, 64)
    _, report = fine_tune(mlp(), train, val, FinetuneConfig(epochs=1), input_names=["x"])
    assert report.precision in ("fp32", "bf16")
    assert report.precision_note is not None
    if report.precision == "fp32":
        assert "slower than fp32 on this CPU" in report.precision_note
    else:
        assert "the speed of fp32" in report.precision_note


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU precision choice")
def test_the_cpu_precision_probe_runs_once_per_kind_of_model(digits: tuple[np.ndarray, np.ndarray]) -> None:
    from optimizer.training import search

    search._CPU_CHOICE.clear()
    train, val = split(digits, 128, 64)
    _, first = fine_tune(mlp(), train, val, FinetuneConfig(epochs=1), input_names=["x"])
    assert list(search._CPU_CHOICE) == [("cpu", ("Linear",))]
    assert search._CPU_CHOICE["cpu", ("Linear",)] == (first.precision, first.precision_note)
    _, second = fine_tune(mlp(hidden=64, seed=2), train, val, FinetuneConfig(epochs=1), input_names=["x"])
    assert (second.precision, second.precision_note) == (first.precision, first.precision_note)  # reused
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    fine_tune(cnn, train, val, FinetuneConfig(epochs=1), input_names=["x"])
    assert sorted(search._CPU_CHOICE) == [("cpu", ("Conv2d", "Linear")), ("cpu", ("Linear",))]  # probed anew


def test_fp16_on_cpu_trains_in_fp32_with_a_note(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 64, 32)
    _, report = fine_tune(mlp(), train, val, FinetuneConfig(epochs=1, precision="fp16"), input_names=["x"])
    assert report.precision == "fp32"
    assert report.precision_note == "fp16 autocast is not used on CPU: trained in fp32"


def test_a_failing_teacher_is_one_clear_error(digits: tuple[np.ndarray, np.ndarray]) -> None:
    def teacher(feed: dict[str, np.ndarray]) -> np.ndarray:
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions\nmore detail")

    train = SampleData({"x": digits[0][:50]})
    expected = r"^the teacher model failed on the sample data: \[ONNXRuntimeError\].*dimensions$"
    with pytest.raises(PassFailed, match=expected):
        fine_tune(mlp(), train, None, FinetuneConfig(epochs=1), input_names=["x"], teacher=teacher)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 64, 32)
    with pytest.raises(InvalidConfig, match="no CUDA device"):
        fine_tune(mlp(), train, val, FinetuneConfig(epochs=1), input_names=["x"], device="cuda")


def test_config_rejects_unknown_fields() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        FinetuneConfig(epoch=3)  # type: ignore[call-arg]


@pytest.mark.gpu
@needs_cuda
def test_fp16_with_grad_scaler_on_cuda(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 400, 200)
    start = mlp()
    config = FinetuneConfig(epochs=5, precision="fp16", lr=0.01, batch_size=32)
    tuned, report = fine_tune(copy.deepcopy(start), train, val, config, input_names=["x"], device="cuda")
    assert report.precision == "fp16"
    assert report.devices == [f"cuda:{torch.cuda.current_device()}"]
    assert next(tuned.parameters()).is_cuda
    assert val_loss(tuned.cpu(), val) < val_loss(start, val)


@pytest.mark.gpu
@needs_cuda
def test_auto_precision_on_cuda_uses_reduced_precision(digits: tuple[np.ndarray, np.ndarray]) -> None:
    train, val = split(digits, 200, 100)
    _, report = fine_tune(mlp(), train, val, FinetuneConfig(epochs=2), input_names=["x"], device="cuda")
    assert report.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


# --------------------------------------------------------------------------------------------
# distillation weight and temperature, input augmentation


def images_16(digits: tuple[np.ndarray, np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits upsampled to 16x16 (each pixel repeated 2x2): image-shaped enough to augment."""
    images, labels = digits
    return np.ascontiguousarray(np.kron(images[:count], np.ones((1, 1, 2, 2), np.float32))), labels[:count]


def test_augmented_copy_is_a_small_shift_plus_noise(digits: tuple[np.ndarray, np.ndarray]) -> None:
    from optimizer.training.augment import augmented_copy

    images, _ = images_16(digits, 40)
    copy_a = augmented_copy({"x": images}, seed=1)["x"]
    assert copy_a.shape == images.shape and copy_a.dtype == images.dtype
    assert np.array_equal(copy_a, augmented_copy({"x": images}, seed=1)["x"])
    assert not np.array_equal(copy_a, augmented_copy({"x": images}, seed=2)["x"])
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    shifts = []
    for index in range(len(images)):  # each copy is its image moved by at most 2 pixels, plus a little noise
        errors = {
            (dy, dx): float(np.abs(copy_a[index] - padded[index, :, 2 - dy : 18 - dy, 2 - dx : 18 - dx]).max())
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        }
        best = min(errors, key=lambda key: errors[key])
        assert errors[best] < 0.2 * float(images.std())
        shifts.append(best)
    assert len(set(shifts)) > 5  # the samples moved in different directions


def test_augmentation_applies_to_image_inputs_with_a_teacher_only() -> None:
    from optimizer.training.augment import enabled

    image = np.zeros((4, 1, 16, 16), np.float32)
    assert enabled("auto", {"x": image}, distills=True)
    assert not enabled("auto", {"x": image}, distills=False)
    assert not enabled("off", {"x": image}, distills=True)
    small, flat, ints = np.zeros((4, 1, 8, 8), np.float32), np.zeros((4, 64), np.float32), image.astype(np.int64)
    for inputs in ({"x": small}, {"x": flat}, {"x": ints}, {"x": image, "mask": flat}):
        assert not enabled("auto", inputs, distills=True)
    with pytest.raises(InvalidConfig, match="H and W >= 16"):
        enabled("on", {"x": flat}, distills=True)
    with pytest.raises(InvalidConfig, match="needs a teacher"):
        enabled("on", {"x": image}, distills=False)


def test_augmented_samples_learn_from_the_teacher_alone() -> None:
    from optimizer.training.loop import Prepared, compute_loss

    output = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    labelled = torch.cat([torch.tensor([[0.0], [2.0]]), teacher], dim=1)
    augmented = torch.cat([torch.full((2, 1), -1.0), teacher], dim=1)
    empty: list[Any] = []

    def loss(weight: float, target: Any, temperature: float = 2.0) -> float:
        data = Prepared(empty, empty, "cross_entropy+distillation", True, weight, temperature)
        return float(compute_loss(data, output, target))

    ce = float(torch.nn.functional.cross_entropy(output, torch.tensor([0, 2])))
    kd = float(
        torch.nn.functional.kl_div(
            torch.log_softmax(output / 4, -1),
            torch.log_softmax(teacher / 4, -1),
            reduction="batchmean",
            log_target=True,
        )
        * 16
    )
    assert loss(0.0, labelled) == pytest.approx(ce)
    assert loss(1.0, labelled, temperature=4.0) == pytest.approx(kd)
    assert loss(0.0, augmented) == 0.0  # no label: no cross-entropy
    assert loss(0.3, augmented, temperature=4.0) == pytest.approx(0.3 * kd)
    assert loss(0.3, labelled, temperature=4.0) == pytest.approx(0.7 * ce + 0.3 * kd)


def test_fine_tune_augments_image_inputs_when_distilling(digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = images_16(digits, 300)
    torch.manual_seed(0)
    teacher_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    calls: list[int] = []

    def teacher(feed: dict[str, np.ndarray]) -> np.ndarray:
        calls.append(len(feed["x"]))
        with torch.no_grad():
            return teacher_model(torch.from_numpy(feed["x"])).numpy()

    def student() -> Any:
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))

    train = SampleData({"x": images[:200]}, labels[:200])
    val = SampleData({"x": images[200:]}, labels[200:])
    config = FinetuneConfig(epochs=2, batch_size=50, precision="fp32", augment_views=3, distill_weight=0.8)
    _, report = fine_tune(student(), train, val, config, input_names=["x"], teacher=teacher)
    assert report.augment_views == 3 and report.distill_weight == 0.8 and report.temperature == 2.0
    assert sum(calls) == 200 + 100 + 3 * 200  # every copy's teacher outputs computed once, before training
    off = config.model_copy(update={"augment": "off"})
    _, plain = fine_tune(student(), train, val, off, input_names=["x"], teacher=teacher)
    assert plain.augment_views == 0
    assert plain.history[0].train_loss != report.history[0].train_loss  # the copies were trained on
    _, hard = fine_tune(student(), train, val, config.model_copy(update={"augment": "auto"}), input_names=["x"])
    assert (hard.augment_views, hard.distill_weight, hard.temperature) == (0, None, None)  # no teacher
    with pytest.raises(InvalidConfig, match="needs a teacher"):
        fine_tune(student(), train, val, config.model_copy(update={"augment": "on"}), input_names=["x"])


def test_distillation_options_are_validated() -> None:
    from pydantic import ValidationError

    for bad in ({"distill_weight": 1.5}, {"temperature": 0}, {"augment": "sometimes"}, {"augment_views": 0}):
        with pytest.raises(ValidationError):
            FinetuneConfig(**bad)
