"""uvicorn's httptools protocol with a deadline on request heads, so slow clients are cut off.

uvicorn bounds only one wait: the keep-alive timer, armed after a response and cancelled by the
next bytes. Nothing bounds a connection that sends nothing after it opens, or a request head that
began and never ends (slowloris), or the rest of a body that keeps trickling in after the request
was answered (the app stopped reading; each chunk cancels the keep-alive timer): each holds a
connection and a file descriptor for as long as the client likes. :class:`DeadlineProtocol` adds:

* a connection that sends nothing after it opens is idle, exactly like one after a response: it
  gets uvicorn's own keep-alive timer (``SLIMSERVE_KEEP_ALIVE_SECONDS``). Not a shorter deadline:
  a proxy that opens connections ahead of use relies on the same rule as for reused ones (the
  README's: the server's idle timeout above the proxy's);
* once bytes arrive that no handler is waiting for (a new request head, or the leftover body of a
  request already answered), the client has ``head_timeout`` in all to finish them: the request
  head up to its blank line, or the leftover body to its end. That is ``SLIMSERVE_UPLOAD_IDLE_SECONDS``,
  the pause allowed while a client sends a request (its body's chunks are bounded by it too, by the
  routes): a head is a few hundred bytes that come in one packet, so a client that takes longer than
  the allowed pause in a body to send one is stalling, not slow. No new setting: none is needed
  that the two existing ones do not already express. (nginx bounds the same phases: its
  ``client_header_timeout`` and ``lingering_time``.) The timer is armed only when a packet leaves
  a head unfinished, so the usual request, whose head comes whole, costs no timer at all.

When the deadline passes the connection is closed without an answer (there is no request to answer
yet); if an earlier request on it is still being answered (pipelining) it is closed right after that
answer instead. A request body the app is reading is not timed here but by the routes themselves
(``service.http.bodies``, ``service.uploads``), which answer 400 "stalled": they wait only while the
app waits, so a large upload that the app reads slower than it arrives (its reads paused by flow
control) is never cut off.

uvicorn's h11 protocol is not covered: ``httptools`` is a pinned dependency (``pyproject.toml``), so
the httptools protocol is always the one that runs.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class DeadlineProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` whose request heads (and leftover bodies) must arrive within ``head_timeout``."""

    #: Seconds a client has to finish a request head once it began (see the module docstring).
    head_timeout: float = 60.0

    _deadline: asyncio.TimerHandle | None = None
    _in_head = False  #: a request head has begun and is not complete
    _in_message = False  #: a request has begun and its body has not ended

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the connection as idle: uvicorn's keep-alive timer runs until the first bytes come."""
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline with the connection."""
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse ``data``; start the deadline if it leaves a head, or the body of an answered request, unfinished.

        Checked after parsing, so the usual request (its head in one packet) never arms a timer.
        """
        super().data_received(data)
        if self._deadline is not None or not self._in_message:
            return
        if self._in_head or (self.cycle is not None and self.cycle.response_complete):
            self._deadline = self.loop.call_later(self.head_timeout, self._deadline_passed)

    def on_message_begin(self) -> None:
        """A request begins (possibly pipelined behind one in progress)."""
        super().on_message_begin()
        self._in_head = self._in_message = True

    def on_headers_complete(self) -> None:
        """The head is complete: the request is the app's now (its body is timed by the routes)."""
        self._in_head = False
        self._cancel_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The body has ended: one still arriving after its request was answered no longer holds the deadline."""
        self._in_message = False
        self._cancel_deadline()
        super().on_message_complete()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # an earlier request is being answered: close right after it
        elif not self.transport.is_closing():
            self.transport.close()


def protocol_class(head_timeout: float) -> type[DeadlineProtocol]:
    """A :class:`DeadlineProtocol` with ``head_timeout`` seconds, for ``uvicorn.Config(http=...)``."""
    seconds = head_timeout

    class ConfiguredDeadlineProtocol(DeadlineProtocol):
        head_timeout = seconds

    return ConfiguredDeadlineProtocol
