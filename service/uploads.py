"""Stream a ``multipart/form-data`` upload (``model``, ``data``, optional ``config``) into staged files.

The body is parsed as it arrives with python-multipart's low-level ``MultipartParser`` (not
starlette's ``request.form()``, which spools every part to a temp file that we would then copy
again). File parts go straight to unique ``.upload-*`` files in the staging folder, hashed
(sha256) on the way; the event loop only parses and gathers data into ~1 MiB buffers, and the
hashing and writing run on a thread of the upload's own, overlapping the next receive. Memory is
bounded by the buffers (and the small config part). Sizes are checked before reading
(Content-Length) and as the bytes arrive.

Staged files are not fsynced here: publishing them (``ArtifactStore.put_file``) fsyncs. On any
error, or if the caller is cancelled, every staged file is removed before the error leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartState, parse_options_header

from service.errors import BadRequest, ServiceError, StorageFull, TooLarge

#: Bytes gathered before one write to the staged file.
FLUSH_BYTES = 1 << 20
#: Bytes of each file kept for format sniffing.
HEAD_BYTES = 64
#: Allowance for multipart boundaries and part headers on top of the parts' limits.
ENVELOPE_BYTES = 64 * 1024
_FILE_PARTS = ("model", "data")
_PARTS = (*_FILE_PARTS, "config")
_PLAIN_ENCODINGS = (b"", b"binary", b"8bit", b"7bit")


@dataclass
class StagedFile:
    """One uploaded file in the staging folder."""

    path: Path
    size: int
    sha256: str
    filename: str | None
    head: bytes  #: the first 64 bytes, for format sniffing


@dataclass
class StagedUpload:
    """The staged parts of one upload; ``cleanup()`` removes whatever is still staged."""

    model: StagedFile
    data: StagedFile
    config: bytes | None

    def cleanup(self) -> None:
        """Remove the staged files (those already published by a move are gone already)."""
        self.model.path.unlink(missing_ok=True)
        self.data.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class UploadLimits:
    """Largest accepted size of each part, in bytes."""

    model_bytes: int
    data_bytes: int
    config_bytes: int = 64 * 1024
    idle_seconds: float = 60.0  #: longest wait for the next chunk of the body

    @property
    def body_bytes(self) -> int:
        """Largest accepted body: every part at its limit plus the multipart envelope."""
        return self.model_bytes + self.data_bytes + self.config_bytes + ENVELOPE_BYTES


@dataclass
class _FileSink:
    """A file part being staged: its temp file, the bytes not yet written, size, hash and head."""

    name: str
    path: Path
    fd: int | None
    limit: int
    filename: str | None
    size: int = 0
    pending: bytearray = field(default_factory=bytearray)
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    head: bytes = b""
    done: bool = False
    closing: bool = False  #: the last buffer is queued; the writer thread closes the file

    def add(self, data: bytes, start: int, end: int) -> None:
        """Take bytes from the parser (on the event loop): count them against the limit, buffer them."""
        self.size += end - start
        if self.size > self.limit:
            raise TooLarge(f"the {self.name} part is larger than the limit of {self.limit} bytes")
        self.pending += memoryview(data)[start:end]

    def take(self) -> bytearray:
        """The buffered bytes, leaving an empty buffer behind."""
        buffer, self.pending = self.pending, bytearray()
        return buffer

    def write(self, buffer: bytearray, close: bool) -> None:
        """Hash and write ``buffer`` (on the writer thread); close the file when ``close``."""
        if len(self.head) < HEAD_BYTES:
            self.head += bytes(buffer[: HEAD_BYTES - len(self.head)])
        self.digest.update(buffer)
        view = memoryview(buffer)
        assert self.fd is not None
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise _staging_error(exc) from exc
        if close:
            self.close()

    def close(self) -> None:
        """Close the temp file (idempotent)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def staged(self) -> StagedFile:
        """The finished file."""
        return StagedFile(self.path, self.size, self.digest.hexdigest(), self.filename, self.head)


class _Receiver:
    """The parser's callbacks and the state of one upload."""

    def __init__(self, staging_dir: Path, limits: UploadLimits) -> None:
        self.staging_dir = staging_dir
        self.limits = limits
        self.files: dict[str, _FileSink] = {}
        self.config: bytearray | None = None
        self.current: _FileSink | bytearray | None = None
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, object]:
        """The callbacks for ``MultipartParser``."""
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip(b" \t")
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        raw_name = options.get(b"name")
        if disposition != b"form-data" or raw_name is None:
            raise BadRequest("each multipart part needs a Content-Disposition of form-data with a name")
        name = raw_name.decode("latin-1")
        if name not in _PARTS:
            raise BadRequest(f"unknown multipart part {name[:40]!r} (expected model, data and optional config)")
        if name in self.files or (name == "config" and self.config is not None):
            raise BadRequest(f"the {name} part is sent more than once")
        encoding = self._headers.get(b"content-transfer-encoding", b"").strip().lower()
        if encoding not in _PLAIN_ENCODINGS:
            raise BadRequest("Content-Transfer-Encoding is not supported in uploads")
        if name == "config":
            self.config = bytearray()
            self.current = self.config
            return
        fd, path = tempfile.mkstemp(prefix=".upload-", suffix=f".{name}", dir=self.staging_dir)
        limit = self.limits.model_bytes if name == "model" else self.limits.data_bytes
        sink = _FileSink(name, Path(path), fd, limit, _clean_filename(options.get(b"filename")))
        self.files[name] = sink
        self.current = sink

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if isinstance(self.current, _FileSink):
            self.current.add(data, start, end)
        elif self.current is not None:
            if len(self.current) + end - start > self.limits.config_bytes:
                raise TooLarge(f"the config part is larger than the limit of {self.limits.config_bytes} bytes")
            self.current += memoryview(data)[start:end]

    def _on_part_end(self) -> None:
        if isinstance(self.current, _FileSink):
            self.current.done = True
        self.current = None

    def _on_end(self) -> None:
        self.ended = True

    def result(self) -> StagedUpload:
        """The staged upload, or BadRequest naming the missing part."""
        for name in _FILE_PARTS:
            if name not in self.files:
                raise BadRequest(f"the upload has no {name} part")
        config = bytes(self.config) if self.config is not None else None
        return StagedUpload(self.files["model"].staged(), self.files["data"].staged(), config)

    def remove_all(self) -> None:
        """Close and delete every staged file."""
        for sink in self.files.values():
            try:
                sink.close()
            finally:
                sink.path.unlink(missing_ok=True)


def sweep_staging(staging_dir: Path, idle_seconds: float) -> int:
    """Delete the ``.upload-*`` files in ``staging_dir`` that no upload will finish; how many.

    A server killed mid-upload (SIGKILL, OOM, power) leaves its part files behind. A live upload
    writes to its file at least every ``idle_seconds`` (slower ones are cut off) and a finished
    one is published (renamed away) at once, so a file untouched for twice that long is dead, even
    when another server shares the folder. Run at start; files that cannot be removed are left.
    """
    cutoff = time.time() - 2 * idle_seconds
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(staging_dir):
            if not entry.name.startswith(".upload-"):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _staging_error(exc: OSError) -> ServiceError:
    """StorageFull for a full disk, else one line with the errno's text (never the path)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("no space left to stage the upload")
    return ServiceError(f"could not stage the upload: {exc.strerror or type(exc).__name__}")


def _clean_filename(raw: bytes | None) -> str | None:
    """The client's file name without folders or control characters (informational only), or None."""
    if not raw:
        return None
    try:  # browsers send UTF-8 bytes; fall back to latin-1, which decodes anything
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(ch for ch in text if ch.isprintable())[:255]
    return text or None


def _boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or BadRequest."""
    media_type, options = parse_options_header(content_type or "")
    if media_type != b"multipart/form-data":
        raise BadRequest("the upload must be multipart/form-data")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 70:
        raise BadRequest("the multipart content type has no valid boundary")
    return boundary


class _Writer:
    """Hashes and writes staged buffers on one thread of its own, overlapping the next receive.

    The event loop hands over a buffer and goes back to the socket; it waits only when the same
    file's previous buffer is still being written (so at most two buffers per file are in memory).
    One thread keeps each file's writes in order; :meth:`close` waits for every queued write, so
    no file descriptor is closed while a write on it is still running.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimserve-upload")
        self._pending: dict[str, Future[None]] = {}

    async def submit(self, sink: _FileSink, buffer: bytearray, close: bool) -> None:
        """Queue ``buffer`` for ``sink`` (raises the previous write's error, if any)."""
        previous = self._pending.pop(sink.name, None)
        if previous is not None:
            await asyncio.wrap_future(previous)
        self._pending[sink.name] = self._pool.submit(sink.write, buffer, close)

    async def drain(self) -> None:
        """Wait for every queued write (raising the first error)."""
        pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            await asyncio.wrap_future(future)

    def close(self) -> None:
        """Wait for the thread to finish whatever is queued, then stop it."""
        self._pool.shutdown(wait=True)


async def _flush(receiver: _Receiver, writer: _Writer, final: bool) -> None:
    """Queue every file buffer past FLUSH_BYTES (all of them, closing the files, when ``final``)."""
    for sink in receiver.files.values():
        if sink.fd is None or sink.closing:
            continue
        closing = final or sink.done
        if closing or len(sink.pending) >= FLUSH_BYTES:
            sink.closing = closing
            await writer.submit(sink, sink.take(), closing)


async def receive_upload(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: int | None,
    staging_dir: Path,
    limits: UploadLimits,
) -> StagedUpload:
    """Parse the body from ``chunks`` into staged files in ``staging_dir``.

    BadRequest: not multipart, no boundary, malformed or truncated body, a missing, duplicate or
    unknown part. TooLarge: Content-Length past the limits (before reading) or a part past its
    limit (at once). StorageFull: the staging disk filled up. No staged file survives an error.
    """
    boundary = _boundary(content_type)
    if content_length is not None and content_length > limits.body_bytes:
        raise TooLarge(f"the upload is larger than the limit of {limits.body_bytes} bytes")
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _staging_error(exc) from exc
    receiver = _Receiver(staging_dir, limits)
    writer = _Writer()
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    received = 0
    iterator = aiter(chunks)
    try:
        while not receiver.ended:
            try:
                with anyio.fail_after(limits.idle_seconds):
                    chunk = await anext(iterator)
            except StopAsyncIteration:
                break
            except TimeoutError:  # a stalled client must not hold a connection and staged files forever
                raise BadRequest(f"the upload stalled for more than {limits.idle_seconds:g} s") from None
            except ServiceError:
                raise
            except Exception as exc:  # the client went away (starlette's ClientDisconnect, a reset, ...)
                raise BadRequest("the upload was interrupted before it finished") from exc
            received += len(chunk)
            if received > limits.body_bytes:
                raise TooLarge(f"the upload is larger than the limit of {limits.body_bytes} bytes")
            if content_length is not None and received > content_length:
                raise BadRequest("the body is longer than its Content-Length")
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise BadRequest("the multipart body is malformed") from exc
            except OSError as exc:  # creating a staged file
                raise _staging_error(exc) from exc
            await _flush(receiver, writer, final=False)
        if not receiver.ended or parser.state != MultipartState.END:
            raise BadRequest("the upload ended before the closing multipart boundary")
        await _flush(receiver, writer, final=True)
        await writer.drain()
        return receiver.result()
    except BaseException:
        writer.close()  # no write may still run on a descriptor that is about to be closed
        receiver.remove_all()
        raise
    finally:
        writer.close()
