"""Choosing among measured candidates: acceptance, the Pareto front, and the objective.

Speed here is a candidate's ``speedup``: its throughput at the serving batch size over the
baseline's, timed in rounds alternating with the baseline (the baseline is 1.0). Acceptance: inside
the accuracy budget and not slower than the baseline. The Pareto front is over (accuracy, speed,
size) with the baseline included as a point. The objective picks among accepted candidates:
highest speedup, lowest batch-1 p50 latency, or smallest size (ties broken by speedup).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optimizer.report import Candidate, Measurement


@dataclass(frozen=True)
class Point:
    """A model's position for the Pareto front; every field is oriented 'higher is better'."""

    accuracy: float
    speed: float
    neg_size: float

    @classmethod
    def of(cls, measurement: Measurement, speed: float) -> Point:
        sign = 1.0 if measurement.accuracy.higher_is_better else -1.0
        return cls(sign * measurement.accuracy.value, speed, -float(measurement.size_bytes))

    def dominates(self, other: Point) -> bool:
        mine = (self.accuracy, self.speed, self.neg_size)
        theirs = (other.accuracy, other.speed, other.neg_size)
        return all(a >= b for a, b in zip(mine, theirs, strict=True)) and mine != theirs


def pareto_flags(baseline: Measurement, candidates: Sequence[Candidate]) -> list[bool]:
    """For each candidate: is it on the Pareto front of baseline + candidates?"""
    points = [Point.of(baseline, 1.0)] + [Point.of(c, c.speedup) for c in candidates]
    return [not any(other.dominates(points[i + 1]) for other in points) for i in range(len(candidates))]


def acceptance(drop: float, budget: float, speedup: float) -> tuple[bool, str]:
    """Whether a candidate qualifies, and the one-line reason."""
    if drop > budget:
        return False, f"accuracy drop {drop:.4g} exceeds the budget {budget:.4g}"
    if speedup < 1.0:
        return False, f"slower than the baseline ({speedup:.2f}x its throughput, timed alternately with it)"
    return True, f"accuracy drop {drop:.4g} within the budget {budget:.4g}"


def _batch1_p50(candidate: Candidate) -> float:
    for perf in candidate.performance:
        if perf.batch_size == 1:
            return perf.latency_ms.p50
    return candidate.latency_ms.p50


def choose(candidates: Sequence[Candidate], objective: str) -> Candidate | None:
    """The best accepted candidate under the objective, or None when none is accepted."""
    accepted = [c for c in candidates if c.accepted]
    if not accepted:
        return None
    if objective == "latency":
        return min(accepted, key=lambda c: (_batch1_p50(c), -c.speedup))
    if objective == "size":
        return min(accepted, key=lambda c: (c.size_bytes, -c.speedup))
    return max(accepted, key=lambda c: c.speedup)


def chosen_reason(chosen: Candidate | None, objective: str, candidates: Sequence[Candidate]) -> str:
    """One line saying why the winner won (or why the original was kept)."""
    if chosen is None:
        if not candidates:
            return "no candidate could be built; the original model is kept"
        return "no candidate met the accuracy budget without being slower; the original model is kept"
    what = {"throughput": "highest speedup", "latency": "lowest batch-1 latency", "size": "smallest size"}
    accepted = sum(c.accepted for c in candidates)
    return (
        f"{what.get(objective, objective)} among {accepted} accepted candidate(s): "
        f"{chosen.speedup:.2f}x throughput, accuracy drop {chosen.accuracy_drop:.4g}"
    )
