"""A minimal keep-alive HTTP/1.1 client on asyncio (uvloop) with httptools parsing responses.

Why not aiohttp or httpx: on this 2-core machine the load generator gets one core, and aiohttp
topped out there at about 2,700 requests/s (100% of its core, measured against a bare uvicorn
app), below what the servers answer, so it would have measured itself. Writing a pre-encoded
request to a socket and parsing the answer with httptools (uvicorn's C parser, already a
dependency) costs a fraction of that: the same trivial server then ran at 5,000-7,000 requests/s
with the client at 30-40% of its core. Only what the benchmarks send is supported: POST with a
body, ``Content-Length`` or chunked responses, plain ``http://``.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from bench.kserve import HttpRequest

Response = tuple[int, bytes, dict[str, str]]


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: write a pre-encoded request, await the parsed response."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import httptools

        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.chunks: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.broken = False
        self.used_at = loop.time()

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio classes

    def data_received(self, data: bytes) -> None:
        """Feed the parser; a malformed response fails the waiting request and the connection."""
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the waiting request, if any."""
        self._fail(exc or ConnectionResetError("server closed the connection"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        """A new response starts."""
        self.chunks = []
        self.headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep a header (lower-case name)."""
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        """Keep a body chunk (httptools has removed any chunked encoding)."""
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        """Hand the response to the waiting request; close if the server will not keep the connection."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), b"".join(self.chunks), self.headers))
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.broken = True
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        self.broken = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def send(self, data: bytes) -> Response:
        """Write one request and wait for its response (one request at a time per connection)."""
        if self.broken or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.waiter = self.loop.create_future()
        self.transport.write(data)
        return await self.waiter


class Client:
    """Keep-alive connections to one ``http://host:port``: at most ``limit`` open, idle ones reused.

    A connection idle for more than ``max_idle_s`` is closed instead of reused, as HTTP clients and
    proxies do: the server may be closing it at that very moment (its keep-alive timeout), and a
    request sent into that race is answered with a reset, an error the server did not make.
    """

    def __init__(self, base_url: str, limit: int, max_idle_s: float = 2.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError("the load generator speaks plain http://host:port only")
        self.host, self.port = parts.hostname, parts.port or 80
        self.netloc = parts.netloc
        self.limit = limit
        self.max_idle_s = max_idle_s
        self.open = 0
        self.idle: list[Connection] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.made: list[Connection] = []

    def encode(self, request: HttpRequest) -> bytes:
        """The whole request on the wire, built once."""
        head = [f"POST {request.path} HTTP/1.1", f"Host: {self.netloc}", f"Content-Length: {len(request.body)}"]
        head += [f"{name}: {value}" for name, value in request.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + request.body

    async def connect(self) -> Connection:
        """A new connection (not counted against ``limit``: closed loops own theirs)."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: Connection(loop), self.host, self.port)
        self.made.append(protocol)
        return protocol

    async def send(self, data: bytes) -> Response:
        """One request on an idle connection, or a new one below ``limit``, else wait for one to free up."""
        while not self.idle and self.open >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter
        connection = None
        now = asyncio.get_running_loop().time()
        while self.idle and connection is None:
            connection = self.idle.pop()
            if connection.broken or now - connection.used_at > self.max_idle_s:  # closed, or about to be
                if connection.transport is not None:
                    connection.transport.close()
                connection, self.open = None, self.open - 1
        if connection is None:
            self.open += 1
        try:
            if connection is None:
                connection = await self.connect()
            response = await connection.send(data)
        except BaseException:
            if connection is not None and connection.transport is not None:
                connection.transport.close()
            self.open -= 1
            self._wake()
            raise
        if connection.broken:
            self.open -= 1
        else:
            connection.used_at = asyncio.get_running_loop().time()
            self.idle.append(connection)
        self._wake()
        return response

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close every connection this client made."""
        for connection in self.made:
            if connection.transport is not None:
                connection.transport.close()


def fetch(base_url: str, request: HttpRequest) -> Response:
    """Send ``request`` once (same client stack as the load): status, body and headers (lower-case names)."""

    async def go() -> Response:
        client = Client(base_url, 1)
        try:
            return await client.send(client.encode(request))
        finally:
            client.close()

    return asyncio.run(go())
