"""Every Prometheus metric of the service, registered on an injected registry (never the global one).

Job counters and the duration histogram are counted by the process that finished the job (the
in-process worker, or a standalone ``slimserve worker`` with its own metrics port). The queue
depth and the number of running jobs are read from the database at scrape time, so every API
replica reports the same cluster-wide truth instead of its own local view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_log = logging.getLogger(__name__)

JOB_STATUSES = ("succeeded", "failed", "cancelled")
#: Optimization jobs take seconds to hours.
JOB_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


class JobMetrics:
    """Counters of finished jobs and the in-progress gauge of this process's worker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs_total = Counter(
            "slimserve_optimization_jobs_total",
            "Optimization jobs finished, by final status.",
            ["status"],
            registry=registry,
        )
        for status in JOB_STATUSES:  # every series exists from the start, at 0
            self.jobs_total.labels(status=status)
        self.duration = Histogram(
            "slimserve_optimization_job_duration_seconds",
            "Wall time of finished optimization attempts, claim to final state.",
            buckets=JOB_DURATION_BUCKETS,
            registry=registry,
        )
        self.worker_busy = Gauge(
            "slimserve_worker_jobs_in_progress",
            "Optimization jobs this process's worker is running now.",
            registry=registry,
        )

    def job_started(self) -> None:
        """A worker of this process took a job."""
        self.worker_busy.inc()

    def job_ended(self) -> None:
        """A worker of this process let go of its job (whatever the outcome)."""
        self.worker_busy.dec()

    def job_finished(self, status: str, seconds: float) -> None:
        """A job reached a final status in this process after ``seconds``."""
        if status in JOB_STATUSES:
            self.jobs_total.labels(status=status).inc()
            self.duration.observe(max(seconds, 0.0))


class QueueCollector(Collector):
    """``slimserve_optimization_queue_depth`` and ``slimserve_optimization_jobs_in_progress``, read at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            counts = self._counts()
        except Exception as exc:  # a scrape must not fail because the database blinked
            _log.warning("queue metrics unavailable: %s", exc)
            return
        yield GaugeMetricFamily(
            "slimserve_optimization_queue_depth",
            "Optimization jobs waiting for a worker.",
            value=counts.get("queued", 0),
        )
        yield GaugeMetricFamily(
            "slimserve_optimization_jobs_in_progress",
            "Optimization jobs running now, on any worker.",
            value=counts.get("running", 0),
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # no describe at registration: collect() would query the database


def build_registry(counts: Callable[[], dict[str, int]] | None = None) -> tuple[CollectorRegistry, JobMetrics]:
    """A fresh registry with the job metrics (and the queue gauges when ``counts`` is given)."""
    disable_created_metrics()  # no *_created series: dashboards never use them, scrapes stay small
    registry = CollectorRegistry(auto_describe=False)
    metrics = JobMetrics(registry)
    if counts is not None:
        registry.register(QueueCollector(counts))
    return registry, metrics


#: Inference latencies: 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))


class ServingMetrics:
    """Inference metrics, labelled only with registered models and versions (so the series count is bounded).

    Series of a version are created when it is registered and removed when it is unloaded: a
    flood of requests for made-up model names never creates a series.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.requests = Counter(
            "slimserve_inference_requests_total",
            "Inference requests, by answer code.",
            [*labels, "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "slimserve_inference_request_duration_seconds",
            "Inference request time in the server, decode to encode.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "slimserve_inference_queue_duration_seconds",
            "Time a request waited in the batcher's queue.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "slimserve_inference_compute_duration_seconds",
            "ONNX Runtime time of one batch.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "slimserve_inference_batch_size",
            "Rows per executed batch.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "slimserve_inference_queue_depth", "Requests waiting in the batcher.", labels, registry=registry
        )
        self.in_flight = Gauge(
            "slimserve_inference_requests_in_flight",
            "Inference requests in the data plane now: from finding their version to their answer.",
            labels,
            registry=registry,
        )
        self.accuracy = Gauge(
            "slimserve_model_accuracy",
            "Accuracy measured at optimization time (the report's metric).",
            labels,
            registry=registry,
        )
        self.speedup = Gauge(
            "slimserve_model_speedup_ratio",
            "Measured throughput over the original's at the serving batch size.",
            labels,
            registry=registry,
        )
        self.feedback = Counter(
            "slimserve_model_feedback_total",
            "Ground-truth feedback on served predictions.",
            [*labels, "outcome"],
            registry=registry,
        )
        self._codes = ("200", "400", "404", "503", "504", "500")
        #: each registered version's per-request series, looked up once (``labels()`` takes a lock and
        #: builds a key: three of them cost ~5% of the event loop's time per request in a profile)
        self._series: dict[tuple[str, int], _RequestSeries] = {}

    def register(self, model: str, version: int, summary: dict[str, Any] | None) -> None:
        """Create the series of a newly loaded version (at zero) and its offline figures."""
        key = (model, str(version))
        self._series[(model, version)] = _RequestSeries(
            in_flight=self.in_flight.labels(*key),  # at 0, or kept: requests may be in flight while a version reloads
            requests={code: self.requests.labels(*key, code) for code in self._codes},
            duration=self.request_duration.labels(*key),
        )
        for outcome in ("correct", "incorrect"):
            self.feedback.labels(*key, outcome)
        # every series at 0 before the first request, so Prometheus sees that request's increase (rate()
        # needs two samples)
        self.queue_depth.labels(*key).set(0)
        summary = summary or {}
        accuracy = summary.get("accuracy")
        if isinstance(accuracy, int | float):
            self.accuracy.labels(*key).set(float(accuracy))
        speedup = summary.get("speedup")
        self.speedup.labels(*key).set(float(speedup) if isinstance(speedup, int | float) else 1.0)

    def unregister(self, model: str, version: int) -> None:
        """Drop every series of an unloaded version."""
        key = (model, str(version))
        self._series.pop((model, version), None)
        for metric in (self.request_duration, self.queue_duration, self.compute_duration, self.batch_size,
                       self.queue_depth, self.in_flight, self.accuracy, self.speedup):  # fmt: skip
            with contextlib.suppress(KeyError):
                metric.remove(*key)
        for code in self._codes:
            with contextlib.suppress(KeyError):
                self.requests.remove(*key, code)
        for outcome in ("correct", "incorrect"):
            with contextlib.suppress(KeyError):
                self.feedback.remove(*key, outcome)

    def entered(self, model: str, version: int) -> Gauge | None:
        """A request of a registered version entered the data plane: its in-flight series, raised by one.

        The caller lowers the returned series itself when the request is answered. If the version is
        unregistered meanwhile, that series is detached from the metric, so the decrement neither
        exports anything nor recreates a removed series.
        """
        series = self._series.get((model, version))
        if series is None:
            return None
        series.in_flight.inc()
        return series.in_flight

    def request(self, model: str, version: int, code: int, seconds: float) -> None:
        """One answered request of a registered version."""
        series = self._series.get((model, version))
        if series is None:
            return
        counter = series.requests.get(str(code))
        (counter if counter is not None else series.requests["500"]).inc()
        series.duration.observe(seconds)


@dataclasses.dataclass(frozen=True)
class _RequestSeries:
    """The series one request of a registered version touches (children of :class:`ServingMetrics`' metrics)."""

    in_flight: Gauge
    requests: dict[str, Counter]
    duration: Histogram


class NvmlCollector(Collector):
    """GPU memory and utilization per device, when NVML (``pynvml``) and a GPU are present; else nothing."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            pynvml = importlib.import_module("pynvml")  # optional: NVIDIA's nvidia-ml-py
            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no library, no driver, no GPU: no series
            self._nvml = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._nvml is None:
            return
        nvml = self._nvml
        used = GaugeMetricFamily("slimserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("slimserve_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        busy = GaugeMetricFamily("slimserve_gpu_utilization_ratio", "GPU busy fraction.", labels=["gpu"])
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
                busy.add_metric([str(index)], rates.gpu / 100.0)
        except Exception as exc:
            _log.warning("NVML read failed: %s", exc)
            return
        yield from (used, total, busy)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    @classmethod
    def register_if_available(cls, registry: CollectorRegistry) -> None:
        """Add GPU gauges to ``registry`` when NVML answers here."""
        collector = cls()
        if collector._nvml is not None:
            registry.register(collector)


class VersionObserver:
    """The batcher's hooks for one model version, recorded in :class:`ServingMetrics`."""

    def __init__(self, metrics: ServingMetrics, model: str, version: int) -> None:
        key = (model, str(version))
        self._queue = metrics.queue_duration.labels(*key)
        self._compute = metrics.compute_duration.labels(*key)
        self._batch = metrics.batch_size.labels(*key)
        self._depth = metrics.queue_depth.labels(*key)

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self._batch.observe(size)
        self._compute.observe(seconds)

    def depth(self, n: int) -> None:
        self._depth.set(n)
