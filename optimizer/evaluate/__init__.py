"""Evaluation of one model: accuracy, latency/throughput, peak memory and per-operator profile.

Each function takes an ONNX Runtime session (from :func:`optimizer.runtime.create_session`) or a
model path plus :class:`~optimizer.data.SampleData` / a feed, and returns the result types of
:mod:`optimizer.report`.
"""

from optimizer.evaluate.accuracy import accuracy_drop, fidelity, infer_task, predict, score
from optimizer.evaluate.latency import fixed_batch_size, measure, run_feed
from optimizer.evaluate.memory import peak_memory
from optimizer.evaluate.profile import aggregate, bottlenecks

__all__ = [
    "accuracy_drop",
    "aggregate",
    "bottlenecks",
    "fidelity",
    "fixed_batch_size",
    "infer_task",
    "measure",
    "peak_memory",
    "predict",
    "run_feed",
    "score",
]
