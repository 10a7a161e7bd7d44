"""service.serving.feedback: argmax / tolerance judging, one judgement per id, eviction by count and by age."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import BadRequest
from service.serving.feedback import MAX_VALUES_PER_ITEM, PredictionWindow


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_classifier_scores_are_judged_by_argmax_once() -> None:
    window = PredictionWindow()
    window.record("a", np.array([[0.1, 0.7, 0.2]], dtype=np.float32))
    window.record("b", np.array([[3.0, -1.0, 2.0]], dtype=np.float32))
    assert window.judge("a", 1) == "correct"
    assert window.judge("b", 2) == "incorrect"
    assert window.judge("a", 1) == "unknown"  # a label counts once
    assert window.judge("never-seen", 0) == "unknown"
    assert len(window) == 0


def test_several_rows_need_one_label_each_and_all_right() -> None:
    window = PredictionWindow()
    scores = np.array([[0.0, 1.0], [5.0, 1.0], [0.2, 0.3]], dtype=np.float32)
    window.record("r1", scores)
    window.record("r2", scores)
    assert window.judge("r1", [1, 0, 1]) == "correct"
    assert window.judge("r2", [1, 0, 0]) == "incorrect"


def test_regression_values_are_right_within_the_tolerance() -> None:
    window = PredictionWindow()
    for request_id in ("close", "far", "exact"):
        window.record(request_id, np.array([[2.5]], dtype=np.float32))
    window.record("vector", np.array([1.0, -2.0], dtype=np.float64))  # 1-D: one value per row
    window.record("nan", np.array([[np.nan]], dtype=np.float32))
    assert window.judge("close", 2.5004, tolerance=1e-3) == "correct"
    assert window.judge("far", 2.6, tolerance=1e-3) == "incorrect"
    assert window.judge("exact", [2.5]) == "correct"  # default tolerance 0
    assert window.judge("vector", [1.0005, -1.9995], tolerance=1e-3) == "correct"
    assert window.judge("nan", 0.0, tolerance=1e9) == "incorrect"


def test_a_label_that_does_not_fit_is_a_bad_request_and_keeps_the_id() -> None:
    window = PredictionWindow()
    window.record("c", np.array([[0.1, 0.9]], dtype=np.float32))
    for label, message in (
        ("one", "must be a number"),
        (None, "must be a number"),
        ([1, 0], "must hold 1 value"),
        (0.5, "class index"),
        ({"a": 1}, "must be a number"),
    ):
        with pytest.raises(BadRequest, match=message):
            window.judge("c", label)
    assert window.judge("c", 1.0) == "correct"  # an integral float is a class index
    with pytest.raises(ValueError):
        window.judge("c", 1, tolerance=-1)


def test_expired_ids_are_unknown() -> None:
    clock = Clock()
    window = PredictionWindow(ttl_s=60, clock=clock)
    window.record("old", np.array([[1.0, 0.0]]))
    clock.now += 30
    window.record("young", np.array([[1.0, 0.0]]))
    clock.now += 30  # "old" is now 60 s old: expired
    assert window.judge("old", 0) == "unknown"
    assert window.judge("young", 0) == "correct"
    window.record("later", np.array([[1.0, 0.0]]))
    clock.now += 3600
    window.record("fresh", np.array([[1.0, 0.0]]))  # recording also evicts what expired
    assert len(window) == 1


def test_the_oldest_are_evicted_past_max_items_and_a_reused_id_is_renewed() -> None:
    window = PredictionWindow(max_items=3)
    for index in range(3):
        window.record(f"id{index}", np.array([[0.0, 1.0]]))
    window.record("id0", np.array([[1.0, 0.0]]))  # replaces and becomes the newest
    window.record("id3", np.array([[0.0, 1.0]]))  # evicts id1, the oldest now
    assert len(window) == 3
    assert window.judge("id1", 1) == "unknown"
    assert window.judge("id0", 0) == "correct"  # the newer prediction
    for index in range(1000):
        window.record(f"flood{index}", np.array([[0.0, 1.0]]))
    assert len(window) == 3
    assert window.judge("flood999", 1) == "correct" and window.judge("flood996", 1) == "unknown"


def test_outputs_too_large_or_not_numeric_are_not_kept() -> None:
    window = PredictionWindow()
    window.record("big", np.zeros((1, MAX_VALUES_PER_ITEM + 1), dtype=np.float32))
    window.record("text", np.array([["a", "b"]], dtype=object))
    window.record("scalar", np.array(1.0))
    window.record("ok", np.zeros((1, MAX_VALUES_PER_ITEM), dtype=np.float32))
    assert [window.judge(i, 0) for i in ("big", "text", "scalar", "ok")] == ["unknown"] * 3 + ["correct"]
    window.record("ok", np.zeros((1, 2), dtype=np.float32))
    window.record("ok", np.zeros((1, MAX_VALUES_PER_ITEM + 1)))  # a reused id with an unkeepable output: dropped
    assert window.judge("ok", 0) == "unknown"


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        PredictionWindow(max_items=0)
    with pytest.raises(ValueError):
        PredictionWindow(ttl_s=0)
