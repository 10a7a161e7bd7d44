"""uvicorn with a drain phase: on SIGTERM, first stop being ready, then shut down gracefully.

Kubernetes keeps sending traffic to a pod for a moment after SIGTERM (until the endpoint update
reaches every proxy). So the first SIGTERM (or SIGINT) only calls ``on_drain`` (readiness goes
false, requests still queued are answered 503, new ones too) and waits ``drain_seconds``; then
uvicorn's own graceful shutdown runs (no new connections, in-flight requests finish within its
timeout, the app's lifespan closes). A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

_log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal starts a drain phase instead of stopping at once."""

    def __init__(
        self, config: uvicorn.Config, *, on_drain: Callable[[], Awaitable[None]] | None, drain_seconds: float
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._drain_seconds = drain_seconds
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._on_drain is None or self._loop is None or self._drain_seconds <= 0:
            if self._draining and self._on_drain is not None:
                _log.info("second signal: stopping without waiting for the drain period")
            super().handle_exit(sig, frame)
            return
        self._draining = True
        _log.info("draining: not ready; stopping in %.1f s", self._drain_seconds)
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._drain_task = asyncio.ensure_future(self._drain(sig))

    async def _drain(self, sig: int) -> None:
        try:
            if self._on_drain is not None:
                await self._on_drain()
            await asyncio.sleep(self._drain_seconds)
        finally:
            super().handle_exit(sig, None)
