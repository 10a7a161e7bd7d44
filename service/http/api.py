"""Builds the FastAPI application around objects the composition root made (no globals)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.control import ControlPlane
from service.http import handlers, routes_jobs, routes_models, routes_serving, routes_v2
from service.http.auth import KeyRing
from service.http.infer_path import InferFastPath
from service.protocol.codec import CodecLimits
from service.serving.dataplane import DataPlane
from service.settings import Settings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def build_api(
    *,
    plane: ControlPlane,
    settings: Settings,
    registry: CollectorRegistry,
    lifespan: Lifespan,
    dataplane: DataPlane | None = None,
    fast_path: bool = True,
) -> FastAPI:
    """The ASGI app: /v1 routes, KServe v2 (with a data plane), /metrics, /docs, error handlers.

    ``fast_path=False`` leaves the infer requests to FastAPI's routes (the parity test uses it).
    """
    app = FastAPI(
        title="slimserve",
        summary="Upload a model and sample data; get it back faster and smaller, inside your accuracy budget.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.state.plane = plane
    app.state.settings = settings
    app.state.keys = KeyRing(settings.admin_keys, settings.infer_keys)
    handlers.install(app)
    app.include_router(routes_models.router)
    app.include_router(routes_jobs.router)
    if dataplane is not None:
        app.state.dataplane = dataplane
        app.state.codec_limits = CodecLimits()
        app.include_router(routes_serving.router)
        app.include_router(routes_v2.router)
        if fast_path:
            app.add_middleware(InferFastPath, plane=dataplane, keys=app.state.keys, limits=app.state.codec_limits)

    @app.get("/v1/health", tags=["health"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if settings.metrics_enabled and settings.metrics_port is None:

        @app.get("/metrics", include_in_schema=False)
        async def metrics(_request: Request) -> Response:
            body = await anyio.to_thread.run_sync(generate_latest, registry)  # the queue gauges query the database
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
