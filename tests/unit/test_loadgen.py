"""The benchmark load generator's HTTP client and the soak's descriptor check, against a real socket server."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("httptools", reason="the load generator parses responses with httptools (uvicorn's extra)")

from bench.httpclient import Client
from bench.kserve import HttpRequest
from bench.loadgen import open_loop
from bench.soak_bench import Sampler, descriptor_floor
from bench.soak_plot import draw


async def _keep_alive_server() -> tuple[asyncio.Server, list[int]]:
    """A keep-alive server answering every request 200; the list counts its connections."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), accepted


async def _serve_and_send(pauses: list[float], max_idle_s: float) -> tuple[int, list[int]]:
    """A keep-alive server that answers every request 200 and counts connections; the client sends
    one request after each pause. Returns (connections accepted, statuses)."""
    server, accepted = await _keep_alive_server()
    port = server.sockets[0].getsockname()[1]
    client = Client(f"http://127.0.0.1:{port}", limit=4, max_idle_s=max_idle_s)
    data = client.encode(HttpRequest(path="/", body=b"", headers={}, samples=1))
    statuses = []
    try:
        for pause in pauses:
            await asyncio.sleep(pause)
            statuses.append((await client.send(data))[0])
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    return len(accepted), statuses


def test_client_reuses_a_briefly_idle_connection_and_replaces_a_long_idle_one() -> None:
    """Reusing a connection the server may be closing (its keep-alive timeout) risks a reset that
    is the client's doing: past ``max_idle_s`` the client opens a new one instead."""
    accepted, statuses = asyncio.run(_serve_and_send([0.0, 0.05, 0.05], max_idle_s=0.3))
    assert statuses == [200, 200, 200] and accepted == 1
    accepted, statuses = asyncio.run(_serve_and_send([0.0, 0.05, 0.5], max_idle_s=0.3))
    assert statuses == [200, 200, 200] and accepted == 2


def test_descriptor_floor_ignores_files_that_come_and_go_but_sees_a_raised_floor() -> None:
    steady = [(t * 5.0, 0, 17 + (t % 3 == 1) * 4, 40) for t in range(60)]  # 17, with a job's files now and then
    assert descriptor_floor(steady, 60.0, 60.0) == 17 == descriptor_floor(steady, 60.0, None)
    leaking = [(t * 5.0, 0, 17 + t // 10, 40) for t in range(60)]  # one more every 50 s
    assert descriptor_floor(leaking, 60.0, None) > descriptor_floor(leaking, 60.0, 60.0)


def test_open_loop_reports_a_timeline_and_the_soak_picture_draws_it(tmp_path: Path) -> None:
    """The open loop's per-window figures (where in a run a tail happened) and the soak's PNG from them."""
    loop = asyncio.new_event_loop()
    server, _ = loop.run_until_complete(_keep_alive_server())
    thread = threading.Thread(target=loop.run_forever, daemon=True)  # the server runs beside the load generator
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        result = open_loop(url, HttpRequest("/", b"", {}), rate=200, warmup_s=0, duration_s=1)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
        loop.close()
    assert result.requests == 200 and not result.errors
    (window,) = result.timeline
    assert window["start_s"] == 0 and window["failed"] == 0 and window["p50"] is not None
    samples = [(t * 5.0, (150 + t) * 2**20, 17, 40) for t in range(10)]
    picture = tmp_path / "soak.png"
    draw({"soak": {"rate": 200.0, "load": result.as_dict(), "samples": samples}}, picture)
    assert picture.read_bytes().startswith(b"\x89PNG")


def test_the_soak_sampler_outlives_descriptors_closing_under_it() -> None:
    """The soak's memory and descriptor sampler keeps sampling while descriptors come and go (a
    descriptor listed and closed before it is read once stopped it for good, 140 s into a 600 s soak)."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for sock in [socket.socket() for _ in range(50)]:
                sock.close()

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    sampler = Sampler(os.getpid(), every=0.002)
    sampler.start()
    try:
        time.sleep(1.5)
    finally:
        sampler.halt.set()
        sampler.join()
        stop.set()
        churner.join()
    assert sampler.samples[-1][0] >= 1.4, f"sampling stopped at {sampler.samples[-1][0]:.2f} s of 1.5"
