"""The composition root: every long-lived object of the service is built here, and only here.

``create_app(settings)`` returns the ASGI application (what ``slimserve serve`` runs);
``build_services(settings)`` is the part a standalone ``slimserve worker`` shares with it.
Nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from sqlalchemy import Engine

from optimizer.runtime import RuntimeOptions
from service.control import ControlPlane
from service.errors import ServiceError, Unavailable
from service.jobs.store import JobStore
from service.jobs.worker import Worker
from service.metrics import JobMetrics, NvmlCollector, ServingMetrics, VersionObserver, build_registry
from service.serving.batcher import BatchingConfig
from service.serving.dataplane import DataPlane
from service.serving.loading import LoadedVersion
from service.serving.registry import ModelRegistry
from service.settings import Settings
from service.storage.artifacts import ArtifactStore, open_store
from service.storage.catalog import Catalog
from service.storage.db import create_db_engine, migrate

if TYPE_CHECKING:
    from fastapi import FastAPI

_log = logging.getLogger(__name__)
#: How long shutdown waits for the in-process worker to hand its job back.
_WORKER_STOP_SECONDS = 30.0


@dataclass
class Services:
    """The service's long-lived objects, built once per process."""

    settings: Settings
    engine: Engine
    catalog: Catalog
    jobs: JobStore
    artifacts: ArtifactStore
    registry: CollectorRegistry
    metrics: JobMetrics
    plane: ControlPlane

    def worker(self, worker_id: str | None = None) -> Worker:
        """A worker over these services (the caller runs it)."""
        return Worker(
            jobs=self.jobs,
            catalog=self.catalog,
            artifacts=self.artifacts,
            settings=self.settings,
            metrics=self.metrics,
            worker_id=worker_id,
        )

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()


def build_services(settings: Settings, *, queue_gauges: bool = True, migrate_now: bool = True) -> Services:
    """Open the database and the artifact store; ``migrate_now`` brings the schema up to date first.

    ``create_app`` passes ``migrate_now=False`` and migrates in the background (see ``wait_for_schema``),
    so a server whose database is unreachable at start stays live (and not ready) instead of crashing.
    """
    if settings.database_url is None or settings.storage_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.database, busy_timeout_s=settings.database_busy_timeout_seconds)
    if migrate_now:
        migrate(engine)
    artifacts = open_store(
        settings.storage, s3_endpoint_url=settings.s3_endpoint_url, staging_dir=settings.home / "staging"
    )
    catalog = Catalog(engine)
    jobs = JobStore(engine, lease_seconds=settings.lease_seconds)
    registry, metrics = build_registry(jobs.counts if queue_gauges else None)
    ProcessCollector(registry=registry)
    plane = ControlPlane(catalog=catalog, jobs=jobs, artifacts=artifacts, settings=settings)
    return Services(
        settings=settings,
        engine=engine,
        catalog=catalog,
        jobs=jobs,
        artifacts=artifacts,
        registry=registry,
        metrics=metrics,
        plane=plane,
    )


def build_serving(services: Services) -> DataPlane:
    """The model registry (every ready version, batched) and the inference data plane over it."""
    settings = services.settings
    metrics = ServingMetrics(services.registry)
    holder: list[DataPlane] = []

    class Listener:
        def loaded(self, version: LoadedVersion) -> None:
            metrics.register(version.model, version.version, version.summary)

        def unloaded(self, model: str, version: int) -> None:
            metrics.unregister(model, version)
            if holder:
                holder[0].forget(model, version)

    batching = BatchingConfig(
        max_batch_size=settings.max_batch_size,
        preferred_batch_size=tuple(settings.preferred_batch_size),
        max_queue_delay_microseconds=settings.max_queue_delay_microseconds,
        max_queue_size=settings.max_queue_size,
        timeout_s=settings.inference_timeout_seconds,
        max_concurrent_batches=settings.concurrent_batches,
    )
    registry = ModelRegistry(
        catalog=services.catalog,
        artifacts=services.artifacts,
        cache_dir=settings.home / "model-cache",
        runtime=RuntimeOptions(intra_op_threads=settings.inference_threads),
        batching=batching,
        listener=Listener(),
        observers=lambda model, version: VersionObserver(metrics, model, version),
    )
    dataplane = DataPlane(registry=registry, metrics=metrics)
    holder.append(dataplane)
    NvmlCollector.register_if_available(services.registry)
    return dataplane


async def wait_for_schema(engine: Engine, stop: asyncio.Event, interval_s: float) -> bool:
    """Migrate the schema every ``interval_s`` until the database answers (the first try waits one interval).

    True once the schema is current; False when ``stop`` was set first. Other failures (a broken
    migration) propagate: retrying them would only hide the fault.
    """
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return False
        try:
            await anyio.to_thread.run_sync(migrate, engine)
        except Unavailable:
            continue
        _log.info("database reachable: schema is current")
        return True


def _sweep_staging(services: Services) -> None:
    """Remove upload parts a killed server left in the staging folder (see ``sweep_staging``)."""
    from service.uploads import sweep_staging

    try:
        removed = sweep_staging(services.artifacts.staging_dir(), services.settings.upload_idle_seconds)
    except ServiceError as exc:  # the store is unreachable: the upload route will say so
        _log.warning("staging folder not swept: %s", exc)
        return
    if removed:
        _log.info("removed %d staged upload part(s) left by an earlier server", removed)


def create_app(settings: Settings | None = None, *, fast_path: bool = True) -> FastAPI:
    """The ASGI application: the /v1 API, KServe v2 serving and (unless turned off) one in-process worker.

    ``fast_path=False`` leaves inference to FastAPI's routes instead of ``InferFastPath`` (for tests).
    """
    from service.http.api import build_api

    settings = settings or Settings()
    services = build_services(settings, migrate_now=False)
    _sweep_staging(services)
    try:  # at once when the database answers, so the API never sees a missing table
        migrate(services.engine)
        schema_current = True
    except Unavailable as exc:
        _log.warning("database unreachable at start (%s): live but not ready until it answers", exc)
        schema_current = False
    dataplane = build_serving(services) if settings.serve_models else None

    stop = threading.Event()  # the in-process worker's: set when draining starts, and at shutdown

    async def drain() -> None:
        """SIGTERM's first step: the worker hands its job back at once; serving stops being ready."""
        stop.set()
        if dataplane is not None:
            await dataplane.start_draining()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threads: list[threading.Thread] = []
        follow = asyncio.Event()
        sync_tasks: list[asyncio.Task[None]] = []

        async def start() -> None:
            """Once the database answers: the in-process worker and the registry's sync loop."""
            if not schema_current and not await wait_for_schema(
                services.engine, follow, settings.registry_poll_seconds
            ):
                return
            if settings.run_worker and not stop.is_set():
                worker = services.worker()
                thread = threading.Thread(target=worker.run_forever, args=(stop,), name="slimserve-worker", daemon=True)
                thread.start()
                threads.append(thread)
                _log.info("in-process worker started")
            if dataplane is not None:
                sync_tasks.append(
                    asyncio.create_task(dataplane.registry.run_forever(follow, settings.registry_poll_seconds))
                )

        starter = asyncio.create_task(start())
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=services.registry)
        try:
            yield
        finally:
            follow.set()
            await starter
            for task in sync_tasks:
                await task
            if dataplane is not None:
                await dataplane.registry.close()
            stop.set()
            for thread in threads:
                await anyio.to_thread.run_sync(thread.join, _WORKER_STOP_SECONDS)
            if metrics_server is not None:
                metrics_server.shutdown()
            services.close()

    app = build_api(
        plane=services.plane,
        settings=settings,
        registry=services.registry,
        lifespan=lifespan,
        dataplane=dataplane,
        fast_path=fast_path,
    )
    app.state.on_drain = drain
    return app
