"""Every Prometheus metric of the service, registered on an injected registry (never the global one).

Job counters and the duration histogram are counted by the process that finished the job (the
in-process worker, or a standalone ``slimserve worker`` with its own metrics port). The queue
depth and the number of running jobs are read from the database at scrape time, so every API
replica reports the same cluster-wide truth instead of its own local view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

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
