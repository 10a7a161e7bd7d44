"""service.http.protocol: a real uvicorn server (in a thread) with ``DeadlineProtocol``, driven over raw sockets.

The server's idle keep-alive is 2 s and its head deadline 0.5 s. A hang is a failure (every socket has a 10 s
timeout). The cases that must be cut off send far slower than the deadline allows (a byte every 0.1 s of a head
that needs seconds), and the ones that must be served far faster, so no assertion depends on timing margins.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from service.http.protocol import DeadlineProtocol, protocol_class

HEAD_TIMEOUT = 0.5
KEEP_ALIVE = 2
SOCKET_TIMEOUT = 10.0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/early``: 413 without reading the body; ``/slow``: 1 s of work; anything else: the body's length."""
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    size = 0
    if scope["path"] != "/early":
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
    status = 413 if scope["path"] == "/early" else 200
    body = str(size).encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    """A uvicorn server on a free loopback port, running ``DeadlineProtocol`` with the deadline above."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, lifespan="off", http=protocol_class(HEAD_TIMEOUT), timeout_keep_alive=KEEP_ALIVE, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def connect(address: tuple[str, int]) -> socket.socket:
    """A client socket that fails the test instead of waiting forever."""
    return socket.create_connection(address, timeout=SOCKET_TIMEOUT)


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """One response (status, raw head, body) read by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the connection closed in the middle of a response"
        body += chunk
    return int(head.split(b" ")[1]), head, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) before the socket timeout."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def request(path: str, body: bytes = b"") -> bytes:
    """A whole POST request."""
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def send_slowly(sock: socket.socket, data: bytes, pause: float) -> int:
    """Send ``data`` a byte at a time, ``pause`` s apart, until the server closes; the bytes sent."""
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent : sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent
        time.sleep(pause)
    return len(data)


def test_the_protocol_class_carries_its_deadline() -> None:
    """``protocol_class`` makes a ``DeadlineProtocol`` with the given deadline, leaving the base class alone."""
    made = protocol_class(3.5)
    assert issubclass(made, DeadlineProtocol) and made.head_timeout == 3.5
    assert DeadlineProtocol.head_timeout == 60.0


def test_a_connection_that_sends_nothing_is_closed(address: tuple[str, int]) -> None:
    """A connection that opens and sends nothing is idle: the keep-alive timer closes it (stock uvicorn never
    arms that timer before a first response, so the connection stayed open for good)."""
    with connect(address) as sock:
        assert closed_by_server(sock)


def test_half_a_request_head_is_closed(address: tuple[str, int]) -> None:
    """A head that begins and never ends (no blank line) is closed once the deadline passes, unanswered."""
    with connect(address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        assert closed_by_server(sock)


def test_a_head_sent_a_byte_at_a_time_is_cut_off(address: tuple[str, int]) -> None:
    """Slowloris: each byte comes well within the keep-alive time, but the whole head is bounded, so the
    connection is closed long before the head (about 8 s at this pace) is complete."""
    head = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Padding: " + b"a" * 40 + b"\r\n\r\n"
    with connect(address) as sock:
        assert send_slowly(sock, head, 0.1) < len(head), "the whole slow head was accepted"


def test_the_rest_of_a_body_trickling_in_after_the_answer_is_cut_off(address: tuple[str, int]) -> None:
    """A request answered before its body was read (413 here) whose client keeps trickling the body in: each
    chunk cancels uvicorn's keep-alive timer, so only the deadline ends it, before the 100 bytes are all sent."""
    with connect(address) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 413
        assert send_slowly(sock, b"x" * 100, 0.1) < 100, "the trickled body kept the connection open to its end"


def test_a_pipelined_half_head_waits_for_the_answer_in_progress(address: tuple[str, int]) -> None:
    """A whole request (1 s of work) with half of a second head pipelined behind it: when the deadline passes
    mid-work, the first request is still answered in full, then the connection is closed."""
    with connect(address) as sock:
        sock.sendall(request("/slow") + b"GET / HTTP/1.1\r\nHost: ")
        status, head, body = read_response(sock)
        assert (status, body) == (200, b"0")
        assert b"connection: close" in head.lower()
        assert closed_by_server(sock)


def test_a_kept_alive_connection_serves_requests_sent_in_time(address: tuple[str, int]) -> None:
    """Requests on one connection, each sent well within the keep-alive time (one with its head in two packets),
    are all answered: the deadline never fires between or during prompt requests."""
    with connect(address) as sock:
        for pause in (0.0, 0.2, 0.2):
            time.sleep(pause)
            sock.sendall(request("/echo", b"abc"))
            status, _, body = read_response(sock)
            assert (status, body) == (200, b"3")
        whole = request("/echo", b"abcd")
        sock.sendall(whole[:10])
        time.sleep(0.1)
        sock.sendall(whole[10:])
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"4")


def test_a_body_sent_slowly_is_the_apps_to_time(address: tuple[str, int]) -> None:
    """Once a head is complete the protocol stops timing: a body sent a byte every 0.15 s (longer in all than the
    head deadline and than the keep-alive time) is read to its end and answered. The routes bound a body's pauses
    themselves, and only while they wait for it."""
    with connect(address) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 15\r\n\r\n")
        assert send_slowly(sock, b"y" * 15, 0.15) == 15
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"15")
