"""The artifact store: one interface over a local folder and S3-compatible storage (fsspec/s3fs).

Keys are relative POSIX paths the service generates (``models/<prefix>/uploads/original.onnx``);
readers only follow database rows to keys, and a key is only ever visible complete:

- ``LocalStore`` writes a temp file whose name starts with ``.`` in the destination folder (or
  takes a staged file from ``<root>/.staging``, on the same filesystem), fsyncs it, renames it over
  the key and fsyncs the folder. The copy/hash/fsync/rename steps are written here on ``os``
  because no library offers "atomic durable publish with a sha256 on the way" (fsspec's local
  filesystem writes in place).
- ``S3Store`` publishes with one PUT (or one multipart upload, which S3 commits atomically) through
  s3fs, and reads ranges with ranged GETs pinned to the object's ETag.

Errors leave here as ``service.errors`` classes: a missing key is ``NotFound``, a full disk
``StorageFull`` (with nothing partial left behind), an unreachable S3 ``Unavailable``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from service.errors import NotFound, RangeNotSatisfiable, ServiceError, StorageFull

_log = logging.getLogger(__name__)

#: Bytes per read/write while copying and hashing.
COPY_CHUNK = 1 << 20
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class StoredFile:
    """A published artifact: its key, size in bytes and hex sha256."""

    key: str
    size: int
    sha256: str


class ArtifactStore(Protocol):
    """Where artifacts live; every write is atomic per key."""

    def staging_dir(self) -> Path:
        """A local folder for uploads before they are published (same filesystem as a local store)."""
        ...

    def put_file(self, key: str, source: Path, *, move: bool = False, sha256: str | None = None) -> StoredFile:
        """Publish ``source`` under ``key`` atomically; ``move`` consumes the source; ``sha256`` skips rehashing."""
        ...

    def get_file(self, key: str, dest: Path) -> None:
        """Download ``key`` to the local path ``dest`` (atomic: ``dest`` appears complete or not at all)."""
        ...

    def size(self, key: str) -> int:
        """The size of ``key`` in bytes; NotFound when missing."""
        ...

    def iter_range(self, key: str, start: int = 0, end: int | None = None, chunk: int = COPY_CHUNK) -> Iterator[bytes]:
        """Bytes ``[start, end]`` (inclusive; ``end`` None or past the end: to the end), streamed in chunks.

        NotFound and RangeNotSatisfiable are raised by the call itself, before any byte is produced.
        """
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a file."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under the folder ``prefix`` (best effort, idempotent)."""
        ...


def check_key(key: str) -> str:
    """``key`` if it is a safe relative POSIX path, else ValueError.

    Refused: empty, absolute, backslashes, NUL, empty components and components starting with ``.``
    (``..``, ``.``, and the names reserved for temp files and the staging folder).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("artifact key must be a non-empty string")
    if "\\" in key or "\x00" in key or key.startswith("/"):
        raise ValueError("artifact key must be a relative POSIX path without backslashes or NUL")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError("artifact key components must be non-empty and must not start with '.'")
    return key


def open_store(
    url_or_path: str, *, s3_endpoint_url: str | None = None, staging_dir: Path | None = None
) -> ArtifactStore:
    """``s3://bucket/prefix`` -> S3Store (credentials from the usual AWS variables); anything else -> LocalStore.

    ``staging_dir`` is only used by S3Store (default: a folder under the system temp dir); a local
    store stages in ``<root>/.staging`` so that publishing is a rename.
    """
    if url_or_path.startswith("s3://"):
        bucket, _, prefix = url_or_path[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError("storage URL must name a bucket: s3://bucket/prefix")
        from service.storage.s3store import S3Store  # boto and s3fs load only for S3 deployments

        return S3Store(bucket, prefix, endpoint_url=s3_endpoint_url, staging=staging_dir)
    if url_or_path.startswith("file://"):
        url_or_path = url_or_path[len("file://") :]
    return LocalStore(Path(url_or_path))


def _check_range(size: int, start: int, end: int | None, chunk: int) -> int:
    """The last byte to send for ``[start, end]`` of a ``size``-byte file (-1: nothing), or RangeNotSatisfiable."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    if start < 0 or (end is not None and end < start):
        raise RangeNotSatisfiable("invalid byte range")
    if start >= size and not (start == 0 and end is None):
        raise RangeNotSatisfiable(f"range starts past the end of the {size}-byte file")
    return size - 1 if end is None else min(end, size - 1)


def _os_error(exc: OSError, doing: str) -> ServiceError:
    """One line for an OSError: StorageFull for ENOSPC/EDQUOT, else the errno's text (never the path)."""
    if exc.errno in _FULL_ERRNOS:
        return StorageFull("no space left on the artifact storage")
    reason = exc.strerror or type(exc).__name__
    return ServiceError(f"artifact storage failed while {doing}: {reason}")


@contextlib.contextmanager
def _local_errors(doing: str, missing_is_not_found: bool = False) -> Iterator[None]:
    """Translate OSErrors at the boundary; a missing path is NotFound when ``missing_is_not_found``."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        if missing_is_not_found:
            raise NotFound("artifact not found") from exc
        raise _os_error(exc, doing) from exc
    except OSError as exc:
        raise _os_error(exc, doing) from exc


def _stream(
    fh: Any, start: int, last: int, chunk: int, errors: Callable[[], AbstractContextManager[None]]
) -> Generator[bytes, None, None]:
    """Read bytes ``[start, last]`` of the open file ``fh`` in ``chunk``s (each read inside ``errors()``)."""
    with fh:
        with errors():
            fh.seek(start)
        position = start
        while position <= last:
            with errors():
                data = fh.read(min(chunk, last - position + 1))
            if not data:
                raise ServiceError("artifact storage returned fewer bytes than the file holds")
            position += len(data)
            yield data


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (short writes happen on full disks and pipes)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_to_fd(source: BinaryIO, fd: int, want_hash: bool) -> tuple[int, str | None]:
    """Copy ``source`` into ``fd`` in 1 MiB chunks; returns (size, sha256 or None)."""
    digest = hashlib.sha256() if want_hash else None
    buffer = bytearray(COPY_CHUNK)
    view = memoryview(buffer)
    size = 0
    while n := source.readinto(buffer):  # type: ignore[attr-defined]
        if digest is not None:
            digest.update(view[:n])
        _write_all(fd, view[:n])
        size += n
    return size, (digest.hexdigest() if digest is not None else None)


def _hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a local file, streamed."""
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        return os.fstat(fh.fileno()).st_size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every folder it creates."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        _fsync_dir(folder.parent)


def _copy_atomic(source: Path, dest: Path, want_hash: bool) -> tuple[int, str | None]:
    """Copy ``source`` to ``dest`` through a fsynced ``.``-temp file in dest's folder and a rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, 0o644)
            with source.open("rb") as src:
                result = _copy_to_fd(src, fd, want_hash)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return result


class LocalStore:
    """Artifacts in a local folder; see the module docstring for how writes stay atomic and durable."""

    def __init__(self, root: Path) -> None:
        """A store rooted at ``root`` (created on first write)."""
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        return self.root / PurePosixPath(check_key(key))

    def staging_dir(self) -> Path:
        """``<root>/.staging``: on the store's filesystem, so publishing a staged file is a rename."""
        path = self.root / ".staging"
        with _local_errors("creating the staging folder"):
            _makedirs_durable(path)
        return path

    def put_file(self, key: str, source: Path, *, move: bool = False, sha256: str | None = None) -> StoredFile:
        """Publish ``source`` under ``key``: fsynced temp file (or the moved source), rename, fsync the folder."""
        dest = self._path(key)
        with _local_errors("storing an artifact"):
            _makedirs_durable(dest.parent)
            if move:
                size, digest = _hash_file(source) if sha256 is None else (source.stat().st_size, sha256)
                if self._move(source, dest):
                    return StoredFile(key, size, digest)
            size, copied_digest = _copy_atomic(source, dest, want_hash=sha256 is None)
            if move:
                source.unlink(missing_ok=True)
        return StoredFile(key, size, sha256 or copied_digest or "")

    @staticmethod
    def _move(source: Path, dest: Path) -> bool:
        """fsync ``source`` and rename it to ``dest``; False when they are on different filesystems."""
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(source, dest)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return False
            raise
        _fsync_dir(dest.parent)
        return True

    def get_file(self, key: str, dest: Path) -> None:
        """Copy ``key`` to ``dest`` through a temp file in dest's folder and a rename."""
        source = self._path(key)
        if not source.is_file():
            raise NotFound("artifact not found")
        with _local_errors("reading an artifact"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy_atomic(source, dest, want_hash=False)

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes; NotFound when missing."""
        with _local_errors("reading an artifact", missing_is_not_found=True):
            st = os.stat(self._path(key))
        if not stat.S_ISREG(st.st_mode):
            raise NotFound("artifact not found")
        return st.st_size

    def iter_range(self, key: str, start: int = 0, end: int | None = None, chunk: int = COPY_CHUNK) -> Iterator[bytes]:
        """Bytes ``[start, end]`` of ``key``, read from the file opened now (a later replace doesn't tear it)."""
        path = self._path(key)
        with _local_errors("reading an artifact", missing_is_not_found=True):
            fh = path.open("rb", buffering=0)
        try:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise NotFound("artifact not found")
            last = _check_range(st.st_size, start, end, chunk)
        except BaseException:
            fh.close()
            raise
        return _stream(fh, start, last, chunk, lambda: _local_errors("reading an artifact"))

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a regular file."""
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        """Remove the folder (or file) ``prefix`` and everything under it; missing is fine, failures are logged."""
        path = self._path(prefix.rstrip("/"))
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("could not delete artifacts under %s: %s", prefix, exc.strerror or exc)
