"""Reading a request body that is not an upload (infer, feedback): checks before, limits while.

Before a byte is read: any ``Content-Encoding`` is 415 (the service never inflates a body, so no
compressed body can grow past a limit) and a declared ``Content-Length`` over the limit is 413.
While reading: the running size is checked against the limit (413 at once, chunked bodies too),
and each wait for the next chunk is bounded by the idle limit, ``SLIMSERVE_UPLOAD_IDLE_SECONDS``
(400 "stalled", the answer a stalled upload gets from ``service.uploads``): a client that sends
half a body and then nothing cannot hold its connection forever. The limit is per chunk, not for
the whole body, so a large body sent steadily over a slow link is never cut off.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
from starlette.requests import ClientDisconnect, Request

from service.errors import BadRequest, TooLarge, UnsupportedFormat


def refuse_compressed(headers: Mapping[str, str]) -> None:
    """415 for a body with any ``Content-Encoding`` but identity (uploads check this too)."""
    if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise UnsupportedFormat("compressed request bodies are not accepted; send the content as it is")


def check_body_headers(headers: Mapping[str, str], max_bytes: int) -> None:
    """415 for a compressed body, 413 for a declared length over ``max_bytes`` (before reading it)."""
    refuse_compressed(headers)
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large(max_bytes)


def too_large(max_bytes: int) -> TooLarge:
    """The 413 of a body past its limit."""
    return TooLarge(f"the request body is larger than the limit of {max_bytes} bytes")


def stalled(idle_seconds: float) -> BadRequest:
    """The 400 of a body whose next chunk did not come within ``idle_seconds``."""
    return BadRequest(f"the request body stalled for more than {idle_seconds:g} s")


async def read_body(request: Request, max_bytes: int, idle_seconds: float) -> bytes:
    """The whole body of ``request``: 415/413 from its headers, 413 past ``max_bytes``, 400 when it stalls.

    A client that goes away midway is a 400 too (nobody reads it; it keeps the error log clean).
    """
    check_body_headers(request.headers, max_bytes)
    body = bytearray()
    chunks = request.stream()
    while True:
        try:
            with anyio.fail_after(idle_seconds):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            raise stalled(idle_seconds) from None
        except ClientDisconnect:
            raise BadRequest("the request body was interrupted before it finished") from None
        body += chunk
        if len(body) > max_bytes:
            raise too_large(max_bytes)
