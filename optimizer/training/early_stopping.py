"""Early stopping with Keras semantics, independent of any training framework.

Why our own: torch has no early-stopping callback (Lightning's would pull in a whole trainer), and
the rule is a dozen lines. It follows ``keras.callbacks.EarlyStopping``: ``wait`` counts epochs
without an improvement, training stops once ``wait >= patience``; an improvement must beat the
best value by more than ``min_delta`` (``current < best - min_delta`` for "min",
``current > best + min_delta`` for "max"); mode "auto" is "max" for accuracy-like names.

The model's weights are copied (detached, to CPU) only when the monitored value improves, so
:meth:`EarlyStopping.best_state` is the best epoch's state whatever happens to the live model
later. Unlike Keras, restoring is left to the caller (the training loop restores the best weights
at the end of every run, stopped early or not).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from optimizer.errors import InvalidConfig

Mode = Literal["auto", "min", "max"]
_MAX_HINTS = ("acc", "accuracy", "auc")


def resolve_mode(monitor: str, mode: Mode = "auto") -> Literal["min", "max"]:
    """The direction of improvement: "max" for accuracy-like monitors in auto mode, else "min"."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise InvalidConfig(f"early stopping mode must be 'auto', 'min' or 'max', got {mode!r}")
    name = monitor.lower()
    return "max" if any(hint in name for hint in _MAX_HINTS) else "min"


def copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a state dict; tensors are detached and copied to CPU."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if hasattr(value, "detach") and hasattr(value, "to"):
            out[key] = value.detach().to("cpu", copy=True)
        else:
            out[key] = copy.deepcopy(value)
    return out


class EarlyStopping:
    """Stop training once the monitored value has not improved for ``patience`` epochs.

    Call :meth:`update` once per epoch with that epoch's logs; it returns True when training
    should stop now.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 3,
        min_delta: float = 0.0,
        mode: Mode = "auto",
        restore_best_weights: bool = True,
    ) -> None:
        if patience < 0:
            raise InvalidConfig(f"early stopping patience must be >= 0, got {patience}")
        self.monitor = monitor
        self.patience = int(patience)
        self.min_delta = abs(float(min_delta))
        self.mode: Literal["min", "max"] = resolve_mode(monitor, mode)
        self.restore_best_weights = restore_best_weights
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.wait = 0
        self._best_state: dict[str, Any] | None = None
        self._updates = 0

    def is_improvement(self, current: float) -> bool:
        """Whether ``current`` beats the best value by more than ``min_delta`` (NaN never does)."""
        if self.mode == "min":
            return current < self.best - self.min_delta
        return current > self.best + self.min_delta

    def update(self, epoch: int, logs: Mapping[str, float], state: Callable[[], Mapping[str, Any]]) -> bool:
        """Record one epoch's ``logs``; True when training should stop after this epoch.

        ``state`` returns the model's current state dict; it is called (and the result deep-copied
        to CPU) only when the monitored value improves and ``restore_best_weights`` is set.
        """
        if self.monitor not in logs:
            known = ", ".join(sorted(logs)) or "nothing"
            raise InvalidConfig(f"early stopping monitors {self.monitor!r} but the epoch logged {known}")
        current = float(logs[self.monitor])
        first = self._updates == 0
        self._updates += 1
        self.wait += 1
        if self.is_improvement(current):
            self.best = current
            self.best_epoch = epoch
            self.wait = 0
            if self.restore_best_weights:
                self._best_state = copy_state(state())
            return False
        if self.wait >= self.patience and not first:
            self.stopped_epoch = epoch
            return True
        return False

    def best_state(self) -> dict[str, Any] | None:
        """The best epoch's state dict (a private CPU copy), or None when none was recorded."""
        return self._best_state
