"""Builds the FastAPI application around objects the composition root made (no globals)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic.json_schema import models_json_schema

from service.control import ControlPlane
from service.http import handlers, routes_jobs, routes_models, routes_serving, routes_v2
from service.http.auth import KeyRing
from service.http.infer_path import FastPathAPI
from service.http.schemas import ErrorOut, InferRequestIn
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
    app = FastPathAPI(
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
            app.install_fast_path(
                plane=dataplane,
                keys=app.state.keys,
                limits=app.state.codec_limits,
                idle_seconds=settings.upload_idle_seconds,
            )

    @app.get("/v1/health", tags=["health"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if settings.metrics_enabled and settings.metrics_port is None:

        @app.get("/metrics", include_in_schema=False)
        async def metrics(_request: Request) -> Response:
            body = await anyio.to_thread.run_sync(generate_latest, registry)  # the queue gauges query the database
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, made to say what the service really answers (built once, then cached).

    FastAPI documents a 422 ``HTTPValidationError`` for every route with parameters, but
    :mod:`service.http.handlers` answers every validation error 400 with ``{"error": ...}``
    (RELIABILITY.md: "FastAPI's 422 becomes 400"): so each 422 becomes that 400. The v2 infer
    routes read their body raw, so their request body is declared by hand and its model added here.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {
                    "description": "Bad Request",
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    _, extra = models_json_schema(
        [(ErrorOut, "serialization"), (InferRequestIn, "validation")], ref_template="#/components/schemas/{model}"
    )
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault(name, definition)
    app.openapi_schema = schema
    return schema
