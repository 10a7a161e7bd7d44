"""EarlyStopping: Keras semantics on plain dict states (no training framework needed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from optimizer.errors import InvalidConfig
from optimizer.training import EarlyStopping


def feed(stopper: EarlyStopping, values: list[float], key: str = "val_loss") -> int | None:
    """Update once per value (epochs from 1) with a state naming its epoch; the stop epoch or None."""
    for epoch, value in enumerate(values, start=1):
        if stopper.update(epoch, {key: value}, state_of(epoch)):
            return epoch
    return None


def state_of(epoch: int) -> Callable[[], dict[str, Any]]:
    """A state callable whose dict names ``epoch`` (fresh objects on every call)."""
    return lambda: {"epoch": epoch, "w": [epoch]}


def test_stops_after_patience_epochs_without_improvement() -> None:
    stopper = EarlyStopping(patience=2)
    assert feed(stopper, [1.0, 0.9, 0.95, 0.93, 0.5]) == 4
    assert stopper.stopped_epoch == 4
    assert stopper.best == 0.9
    assert stopper.best_epoch == 2
    assert stopper.wait == 2


def test_an_improvement_resets_the_wait() -> None:
    stopper = EarlyStopping(patience=2)
    assert feed(stopper, [1.0, 1.1, 0.8, 0.9, 0.7, 0.75]) is None
    assert stopper.best_epoch == 5
    assert stopper.wait == 1
    assert stopper.stopped_epoch is None


def test_an_improvement_smaller_than_min_delta_does_not_count() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    # 0.95 and 0.91 are better than 1.0 but not by more than 0.1: no reset, stop at epoch 3.
    assert feed(stopper, [1.0, 0.95, 0.91, 0.5]) == 3
    assert stopper.best == 1.0
    assert stopper.best_epoch == 1


def test_an_improvement_larger_than_min_delta_counts() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert feed(stopper, [1.0, 0.85, 0.84, 0.7]) is None
    assert stopper.best_epoch == 4


def test_max_mode_for_accuracy_in_auto_mode() -> None:
    stopper = EarlyStopping(monitor="val_accuracy", patience=1)
    assert stopper.mode == "max"
    assert feed(stopper, [0.5, 0.7, 0.6], key="val_accuracy") == 3
    assert stopper.best == 0.7
    assert stopper.best_epoch == 2


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [("val_loss", "min"), ("train_loss", "min"), ("val_acc", "max"), ("accuracy", "max"), ("val_auc", "max")],
)
def test_auto_mode_follows_the_monitor_name(monitor: str, mode: str) -> None:
    assert EarlyStopping(monitor=monitor).mode == mode


def test_explicit_mode_overrides_the_name() -> None:
    stopper = EarlyStopping(monitor="val_accuracy", mode="min", patience=1)
    assert feed(stopper, [0.5, 0.7], key="val_accuracy") == 2
    assert stopper.best == 0.5


def test_restore_best_weights_keeps_the_best_epochs_state_not_the_last() -> None:
    stopper = EarlyStopping(patience=2)
    feed(stopper, [1.0, 0.4, 0.6, 0.7])
    assert stopper.best_state() == {"epoch": 2, "w": [2]}


def test_best_state_is_a_copy_of_the_live_state() -> None:
    live: dict[str, Any] = {"w": [1.0, 2.0]}
    stopper = EarlyStopping(patience=1)
    stopper.update(1, {"val_loss": 1.0}, lambda: live)
    live["w"][0] = 99.0
    live["extra"] = 1
    assert stopper.best_state() == {"w": [1.0, 2.0]}


def test_tensor_states_are_copied_too() -> None:
    torch = pytest.importorskip("torch")
    weight = torch.ones(3)
    stopper = EarlyStopping(patience=1)
    stopper.update(1, {"val_loss": 1.0}, lambda: {"weight": weight})
    weight.add_(5.0)
    best = stopper.best_state()
    assert best is not None
    assert torch.equal(best["weight"], torch.ones(3))


def test_state_is_only_read_on_improvement() -> None:
    calls: list[int] = []

    def state(epoch: int) -> Callable[[], dict[str, int]]:
        def read() -> dict[str, int]:
            calls.append(epoch)
            return {"epoch": epoch}

        return read

    stopper = EarlyStopping(patience=5)
    for epoch, value in enumerate([1.0, 2.0, 0.5, 3.0], start=1):
        stopper.update(epoch, {"val_loss": value}, state(epoch))
    assert calls == [1, 3]


def test_without_restore_no_state_is_kept() -> None:
    stopper = EarlyStopping(patience=1, restore_best_weights=False)
    feed(stopper, [1.0, 0.5])
    assert stopper.best_state() is None
    assert stopper.best_epoch == 2


def test_nan_is_never_an_improvement() -> None:
    stopper = EarlyStopping(patience=1)
    assert feed(stopper, [1.0, float("nan")]) == 2
    assert stopper.best == 1.0


def test_a_missing_monitor_is_a_config_error() -> None:
    stopper = EarlyStopping(monitor="val_accuracy")
    with pytest.raises(InvalidConfig, match="val_accuracy"):
        stopper.update(1, {"val_loss": 1.0}, dict)
