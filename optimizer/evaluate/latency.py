"""Latency and throughput of one ONNX Runtime session at one batch size.

One feed is built before timing (so data slicing is never timed), the session is warmed up, then
timed with :func:`time.perf_counter` until at least ``min_iterations`` runs *and* ``max_seconds``
have passed, or ``max_iterations`` runs were made. Percentiles come from :func:`numpy.percentile`.
A hand-written loop because ONNX Runtime's own perf tool is a separate binary that cannot time an
in-process session with our providers and options.
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
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if min_iterations < 1 or max_iterations < min_iterations:
        raise ValueError("need 1 <= min_iterations <= max_iterations")
    if len(data) == 0:
        raise ValueError("no samples to time")
    size = fixed_batch_size(session) or batch_size
    feed = data.batch(size)
    for _ in range(max(warmup, 0)):
        run_feed(session, feed)

    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < max_iterations:
        t0 = time.perf_counter()
        run_feed(session, feed)
        t1 = time.perf_counter()
        durations.append(t1 - t0)
        if len(durations) >= min_iterations and t1 - started >= max_seconds:
            break

    seconds = np.asarray(durations, dtype=np.float64)
    p50, p95, p99 = (float(v) * 1000.0 for v in np.percentile(seconds, [50, 95, 99]))
    mean_s = float(seconds.mean())
    return BatchPerformance(
        batch_size=size,
        latency_ms=LatencyStats(p50=p50, p95=p95, p99=p99, mean=mean_s * 1000.0),
        throughput=size / max(mean_s, 1e-9),  # a timer tick of 0 must not divide by zero
        iterations=len(durations),
    )
