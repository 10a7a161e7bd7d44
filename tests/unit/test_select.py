"""Acceptance, Pareto front and objective choice on hand-built measurements."""

from __future__ import annotations

from optimizer.report import AccuracyResult, BatchPerformance, Candidate, LatencyStats, Measurement
from optimizer.select import acceptance, choose, chosen_reason, pareto_flags


def _latency(p50: float) -> LatencyStats:
    return LatencyStats(p50=p50, p95=p50 * 1.2, p99=p50 * 1.5, mean=p50)


def _measurement(acc: float, throughput: float, size: int, higher: bool = True) -> Measurement:
    return Measurement(
        accuracy=AccuracyResult(task="classification", metric="top1", value=acc, higher_is_better=higher, samples=100),
        latency_ms=_latency(32_000 / throughput),
        throughput=throughput,
        size_bytes=size,
        performance=[BatchPerformance(batch_size=32, latency_ms=_latency(1.0), throughput=throughput, iterations=10)],
    )


def _candidate(name: str, acc: float, throughput: float, size: int, drop: float, accepted: bool, p1: float = 1.0):
    m = _measurement(acc, throughput, size)
    perf = [
        BatchPerformance(batch_size=1, latency_ms=_latency(p1), throughput=1000 / p1, iterations=10),
        *m.performance,
    ]
    return Candidate(
        **{**m.model_dump(), "performance": [p.model_dump() for p in perf]},
        name=name,
        techniques=["x"],
        passes=[],
        accuracy_drop=drop,
        speedup=throughput / 100,
        accepted=accepted,
        reason="",
        build_seconds=0.1,
    )


def test_acceptance_needs_budget_and_speed() -> None:
    assert acceptance(0.005, 0.01, 2.0)[0]
    assert acceptance(0.0, 0.01, 1.0)[0]
    ok, reason = acceptance(0.02, 0.01, 2.0)
    assert not ok and "exceeds the budget" in reason
    ok, reason = acceptance(0.0, 0.01, 0.9)
    assert not ok and "slower than the baseline (0.90x" in reason


def test_pareto_marks_only_non_dominated_points() -> None:
    base = _measurement(0.95, 100, 1000)
    fast_small = _candidate("fast-small", 0.94, 300, 300, 0.01, True)
    dominated = _candidate("dominated", 0.93, 250, 400, 0.02, True)  # worse than fast_small on every axis
    accurate = _candidate("accurate", 0.96, 150, 900, -0.01, True)
    assert pareto_flags(base, [fast_small, dominated, accurate]) == [True, False, True]


def test_pareto_and_choice_use_the_paired_speedup_not_the_raw_throughput() -> None:
    """Raw throughputs come from different moments of the job; the speedup was timed against the
    baseline in alternating rounds, so it decides."""
    base = _measurement(0.95, 100, 1000)
    early = _candidate("measured-while-quiet", 0.95, 300, 500, 0.0, True).model_copy(update={"speedup": 1.5})
    late = _candidate("measured-while-busy", 0.95, 200, 500, 0.0, True).model_copy(update={"speedup": 2.5})
    assert pareto_flags(base, [early, late]) == [False, True]
    assert choose([early, late], "throughput").name == "measured-while-busy"  # type: ignore[union-attr]


def test_pareto_respects_lower_is_better_metrics() -> None:
    base = _measurement(0.10, 100, 1000, higher=False)
    worse_mse = _candidate("worse", 0.20, 100, 1000, 0.1, False)
    worse_mse = worse_mse.model_copy(
        update={"accuracy": worse_mse.accuracy.model_copy(update={"higher_is_better": False})}
    )
    assert pareto_flags(base, [worse_mse]) == [False]


def test_objectives_pick_different_winners() -> None:
    a = _candidate("fast", 0.9, 400, 500, 0.0, True, p1=2.0)
    b = _candidate("small", 0.9, 300, 100, 0.0, True, p1=3.0)
    c = _candidate("snappy", 0.9, 350, 400, 0.0, True, p1=0.5)
    d = _candidate("rejected-fastest", 0.5, 900, 50, 0.4, False, p1=0.1)
    assert choose([a, b, c, d], "throughput").name == "fast"  # type: ignore[union-attr]
    assert choose([a, b, c, d], "size").name == "small"  # type: ignore[union-attr]
    assert choose([a, b, c, d], "latency").name == "snappy"  # type: ignore[union-attr]


def test_no_accepted_candidate_keeps_the_original() -> None:
    rejected = _candidate("bad", 0.5, 900, 50, 0.4, False)
    assert choose([rejected], "throughput") is None
    assert "original model is kept" in chosen_reason(None, "throughput", [rejected])
