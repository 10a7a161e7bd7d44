"""Online accuracy: a bounded, expiring window of served predictions that ground-truth labels are judged against.

One :class:`PredictionWindow` per served model version. ``record`` keeps what the version answered
for a request id (reduced to the prediction: the argmax class per row for a classifier, the values
per row otherwise); ``judge`` compares a label sent later and forgets the id, so a label counts once.

Our own few lines rather than a cache library: the window needs insertion-ordered eviction by
count and by age together, which an ``OrderedDict`` gives directly (``cachetools.TTLCache`` would
do it but is not a dependency, and adding one for this is not worth it).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.errors import BadRequest

Outcome = Literal["correct", "incorrect", "unknown"]

#: Predictions larger than this many values are not kept (memory stays bounded per item too).
MAX_VALUES_PER_ITEM = 4096


@dataclass(frozen=True, slots=True)
class _Entry:
    stamp: float
    classes: bool  # True: argmax class per row (int64 [rows]); False: values per row (float64 [rows, k])
    values: np.ndarray


class PredictionWindow:
    """The latest predictions of one model version by request id: at most ``max_items``, none older than ``ttl_s``.

    The oldest entries are evicted first; an expired or evicted id is judged "unknown".
    Not thread-safe: used from the event loop only.
    """

    def __init__(
        self, max_items: int = 10_000, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        self.max_items = max_items
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._items: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        """Predictions held now (expired ones may still count until the next call evicts them)."""
        return len(self._items)

    def record(self, request_id: str, prediction: np.ndarray) -> None:
        """Keep the prediction for ``request_id`` (the version's first output, batch axis first).

        A 2-D output with more than one column is a classifier's scores: the argmax per row is
        kept. Anything else is kept as values per row. A reused id replaces the older entry;
        outputs of more than :data:`MAX_VALUES_PER_ITEM` values or of a non-numeric type are not kept.
        """
        now = self._clock()
        self._expire(now)
        array = np.asarray(prediction)
        self._items.pop(request_id, None)
        if array.ndim == 0 or array.size > MAX_VALUES_PER_ITEM or array.dtype.kind not in "biuf":
            return
        if array.ndim == 2 and array.shape[1] > 1:
            entry = _Entry(now, True, np.argmax(array, axis=1).astype(np.int64))
        else:
            entry = _Entry(now, False, array.reshape(array.shape[0], -1).astype(np.float64))
        self._items[request_id] = entry
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def check(self, request_id: str, label: Any) -> None:
        """BadRequest when ``label`` does not fit the prediction kept for ``request_id``; changes nothing."""
        entry = self._items.get(request_id)
        if entry is not None:
            _label_array(label, entry, request_id)

    def judge(self, request_id: str, label: Any, *, tolerance: float = 0.0) -> Outcome:
        """Compare ``label`` with the prediction kept for ``request_id``, then forget the id.

        ``label``: for a one-row request a class index (classifier) or a number / list of numbers
        (regression); for several rows, a list with one label per row, and "correct" means every
        row is right. Regression values are right within the absolute ``tolerance``. An id not
        held (never recorded, evicted or expired) is "unknown". A label that does not fit the
        prediction's shape: BadRequest (the id is kept).
        """
        if not tolerance >= 0 or not math.isfinite(tolerance):
            raise ValueError("tolerance must be a finite number >= 0")
        self._expire(self._clock())
        entry = self._items.get(request_id)
        if entry is None:
            return "unknown"
        expected = _label_array(label, entry, request_id)
        del self._items[request_id]
        if entry.classes:
            right = bool(np.array_equal(entry.values, expected))
        else:
            right = bool(np.all(np.abs(entry.values - expected) <= tolerance))  # NaN: never right
        return "correct" if right else "incorrect"

    def _expire(self, now: float) -> None:
        """Drop entries older than the TTL (insertion order is age order: the oldest are first)."""
        items = self._items
        while items:
            oldest = next(iter(items.values()))
            if now - oldest.stamp < self.ttl_s:
                break
            items.popitem(last=False)


def _label_array(label: Any, entry: _Entry, request_id: str) -> np.ndarray:
    """``label`` as an array shaped like the entry's values; BadRequest when it does not fit."""
    if isinstance(label, str | bytes) or label is None:
        raise BadRequest(f"label for id {request_id[:64]!r} must be a number or a list of numbers")
    try:
        array = np.asarray(label, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRequest(f"label for id {request_id[:64]!r} must be a number or a list of numbers") from None
    if array.size != entry.values.size:
        raise BadRequest(f"label for id {request_id[:64]!r} must hold {entry.values.size} value(s), got {array.size}")
    array = array.reshape(entry.values.shape)
    if entry.classes:
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise BadRequest(f"label for id {request_id[:64]!r} must be a class index (an integer)")
        return array.astype(np.int64)
    return array
