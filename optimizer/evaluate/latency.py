"""Latency and throughput of one ONNX Runtime session at one batch size.

One feed is built before timing (so data slicing is never timed), the session is warmed up, then
timed with :func:`time.perf_counter` until at least ``min_iterations`` runs *and* ``max_seconds``
have passed, or ``max_iterations`` runs were made. Percentiles come from :func:`numpy.percentile`.
A hand-written loop because ONNX Runtime's own perf tool is a separate binary that cannot time an
in-process session with our providers and options.

:func:`measure_paired` times a candidate in rounds that alternate with the baseline (ABBA order)
and reports the median of the per-round throughput ratios as the speedup: a machine whose speed
drifts during a job (a neighbour on a shared host, frequency scaling) slows both sides of a
round alike, so the ratio stays honest where two measurements a minute apart would not.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from optimizer.errors import InvalidModel, first_line
from optimizer.report import BatchPerformance, LatencyStats

if TYPE_CHECKING:
    import onnxruntime as ort

    from optimizer.data import SampleData


def fixed_batch_size(session: ort.InferenceSession) -> int | None:
    """The fixed size of the inputs' first axis, or None when the batch axis is dynamic.

    A model exported with a static batch (e.g. ``x[4, 3, 224, 224]``) can only run feeds of
    exactly that many samples; callers pad and trim around it. Scalar inputs are ignored.
    """
    for node_arg in session.get_inputs():
        shape = node_arg.shape
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            return int(shape[0])
    return None


def run_feed(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` on every output; ONNX Runtime failures become :class:`InvalidModel`."""
    try:
        return list(session.run(None, feed))
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise InvalidModel(f"inference failed: {first_line(exc)}") from exc


def measure(
    session: ort.InferenceSession,
    data: SampleData,
    batch_size: int,
    *,
    warmup: int = 3,
    min_iterations: int = 10,
    max_iterations: int = 200,
    max_seconds: float = 2.0,
) -> BatchPerformance:
    """Time ``session`` on one feed of ``batch_size`` samples (the model's fixed batch if it has one).

    Returns p50/p95/p99/mean per-call latency in milliseconds, throughput in samples per second
    (batch size over the mean call time) and the number of timed iterations.
    """
    _check(data, batch_size, min_iterations, max_iterations)
    feed, size, _ = _warm(session, data, batch_size, warmup)
    return _performance(size, _timed(session, feed, min_iterations, max_iterations, max_seconds))


#: Untimed calls at the start of each slice of :func:`measure_paired`: right after the other
#: session ran, caches are cold and (on a machine with few cores) its idle threads still spin.
SLICE_WARMUP = 2
#: A call at least this long (seconds, the slower side's last warm-up call) makes a model "slow":
#: :func:`measure_paired` then keeps its rounds within twice ``max_seconds`` and warms each slice
#: with one call. A BERT-class encoder at batch 32 (about 1 s a call) otherwise made 46 calls per
#: candidate and doubled its job; on calls that long a second's drift matters little anyway.
SLOW_CALL_S = 0.1


def measure_paired(
    session: ort.InferenceSession,
    reference: ort.InferenceSession,
    data: SampleData,
    batch_size: int,
    *,
    rounds: int = 5,
    warmup: int = 3,
    min_iterations: int = 10,
    max_iterations: int = 200,
    max_seconds: float = 2.0,
) -> tuple[BatchPerformance, float]:
    """Time ``session`` in ``rounds`` slices alternating with ``reference`` (ABBA order).

    Each side gets ``1/rounds`` of the iteration and time limits per round, so ``session`` is
    timed about as long as :func:`measure` would. Returns ``session``'s performance over all its
    slices and the speedup: the median over rounds of the ratio of the two sides' typical
    throughput in that round (batch size over the slice's median call time, so a call that lost
    the CPU to another process does not decide a round). For a slow model (a call of
    :data:`SLOW_CALL_S` or more) the rounds are cut to what fits in twice ``max_seconds`` (at least
    one) and each slice is warmed by one call instead of :data:`SLICE_WARMUP`.
    """
    if rounds < 1:
        raise ValueError("need rounds >= 1")
    _check(data, batch_size, min_iterations, max_iterations)
    sides = [(timed, *_warm(timed, data, batch_size, warmup)) for timed in (session, reference)]
    least, most = max(1, -(-min_iterations // rounds)), max(1, max_iterations // rounds)
    slice_warmup = SLICE_WARMUP
    call_s = max(side[3] for side in sides)
    if call_s >= SLOW_CALL_S:  # a round would outlast the budget: fewer rounds, one cold call per slice
        slice_warmup = 1
        rounds = max(1, min(rounds, int(2 * max_seconds / (2 * (slice_warmup + least) * call_s))))
    slice_seconds = max_seconds / rounds
    durations: list[float] = []
    ratios: list[float] = []
    for number in range(rounds):
        typical = {}
        for index in (0, 1) if number % 2 == 0 else (1, 0):
            timed, feed, _, _ = sides[index]
            for _ in range(slice_warmup):  # the first calls after the other session ran are cold
                run_feed(timed, feed)
            taken = _timed(timed, feed, least, max(least, most), slice_seconds)
            typical[index] = float(np.median(taken))
            if index == 0:
                durations.extend(taken)
        ratios.append((sides[0][2] / max(typical[0], 1e-9)) / (sides[1][2] / max(typical[1], 1e-9)))
    return _performance(sides[0][2], durations), float(np.median(ratios))


def _check(data: SampleData, batch_size: int, min_iterations: int, max_iterations: int) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if min_iterations < 1 or max_iterations < min_iterations:
        raise ValueError("need 1 <= min_iterations <= max_iterations")
    if len(data) == 0:
        raise ValueError("no samples to time")


def _warm(
    session: ort.InferenceSession, data: SampleData, batch_size: int, warmup: int
) -> tuple[dict[str, np.ndarray], int, float]:
    """The feed to time (the model's fixed batch if it has one), its size, and the last of
    ``warmup`` untimed calls' seconds (0 without warm-up)."""
    size = fixed_batch_size(session) or batch_size
    feed = data.batch(size)
    seconds = 0.0
    for _ in range(max(warmup, 0)):
        started = time.perf_counter()
        run_feed(session, feed)
        seconds = time.perf_counter() - started
    return feed, size, seconds


def _timed(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], least: int, most: int, seconds: float
) -> list[float]:
    """Seconds per call: at least ``least`` calls and ``seconds`` in all, at most ``most`` calls."""
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < most:
        t0 = time.perf_counter()
        run_feed(session, feed)
        t1 = time.perf_counter()
        durations.append(t1 - t0)
        if len(durations) >= least and t1 - started >= seconds:
            break
    return durations


def _performance(size: int, durations: list[float]) -> BatchPerformance:
    seconds = np.asarray(durations, dtype=np.float64)
    p50, p95, p99 = (float(v) * 1000.0 for v in np.percentile(seconds, [50, 95, 99]))
    mean_s = float(seconds.mean())
    return BatchPerformance(
        batch_size=size,
        latency_ms=LatencyStats(p50=p50, p95=p95, p99=p99, mean=mean_s * 1000.0),
        throughput=size / max(mean_s, 1e-9),  # a timer tick of 0 must not divide by zero
        iterations=len(durations),
    )
