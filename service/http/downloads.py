"""Streamed downloads with ``Content-Length``, a sha256 ``ETag`` and single-range ``Range`` support.

Starlette's FileResponse handles ranges for local files only; artifacts may live in S3, so this
streams whatever :meth:`ArtifactStore.iter_range` yields. One ``bytes=`` range is honoured (206);
several ranges are answered with the whole file (200), which RFC 9110 allows.
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from service.control import Download
from service.errors import RangeNotSatisfiable
from service.storage.artifacts import ArtifactStore

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_MEDIA = {"model.onnx": "application/octet-stream", "report.json": "application/json", "report.html": "text/html"}


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a single ``bytes=`` range; None for none or several ranges."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # multiple ranges or another unit: serve the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise RangeNotSatisfiable("range not satisfiable")
        return max(size - count, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable("range not satisfiable")
    return start, end


def stream(request: Request, artifacts: ArtifactStore, item: Download) -> Response:
    """The response for ``item``: 304, 206 or 200."""
    etag = f'"{item.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=0, must-revalidate",
        "Content-Disposition": f'attachment; filename="{item.filename}"',
    }
    if etag in _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    if_range = request.headers.get("if-range")
    try:
        span = parse_range(request.headers.get("range"), item.size) if if_range in (None, etag) else None
    except RangeNotSatisfiable:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{item.size}"})
    media = _MEDIA.get(item.filename, "application/octet-stream")
    if span is None:
        headers["Content-Length"] = str(item.size)
        body = artifacts.iter_range(item.key, 0, item.size - 1) if item.size else iter(())
        return StreamingResponse(body, media_type=media, headers=headers)
    start, end = span
    headers["Content-Length"] = str(end - start + 1)
    headers["Content-Range"] = f"bytes {start}-{end}/{item.size}"
    return StreamingResponse(
        artifacts.iter_range(item.key, start, end), status_code=206, media_type=media, headers=headers
    )


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {part.strip().removeprefix("W/") for part in header.split(",")}
