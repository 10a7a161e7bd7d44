"""Artifacts in an S3-compatible bucket (AWS, MinIO, moto) through fsspec's s3fs.

The same :class:`~service.storage.artifacts.ArtifactStore` contract as the local folder: one PUT
(or a multipart upload S3 commits atomically) per artifact, ranged reads pinned to the object's
ETag, errors translated at this boundary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.errors import NotFound, ServiceError, StorageFull, Unavailable
from service.storage.artifacts import (
    _FULL_ERRNOS,
    COPY_CHUNK,
    StoredFile,
    _check_range,
    _hash_file,
    _local_errors,
    _stream,
    check_key,
)

_log = logging.getLogger(__name__)
#: Multipart part size and parallel parts: bounds an upload's memory to about their product.
S3_PART_BYTES = 8 << 20
S3_PART_CONCURRENCY = 4


class S3Store:
    """Artifacts in an S3 bucket under a prefix, through s3fs (MinIO/moto via ``endpoint_url``)."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, staging: Path | None = None
    ) -> None:
        """A store in ``bucket`` under ``prefix``; uploads are staged in ``staging`` (default: system temp)."""
        import s3fs  # here, not at import time: a local-only deployment never loads boto

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._staging = staging or Path(tempfile.gettempdir()) / "slimserve-staging"
        client_kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
        # Every replica must see the others' writes: no instance or listing caches.
        self._fs: Any = s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            config_kwargs={"connect_timeout": 10, "read_timeout": 60},
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def _path(self, key: str) -> str:
        check_key(key)
        return f"{self.bucket}/{self.prefix}/{key}" if self.prefix else f"{self.bucket}/{key}"

    def staging_dir(self) -> Path:
        """A local folder for uploads before they are sent to S3."""
        with _local_errors("creating the staging folder"):
            self._staging.mkdir(parents=True, exist_ok=True)
        return self._staging

    def put_file(self, key: str, source: Path, *, move: bool = False, sha256: str | None = None) -> StoredFile:
        """Upload ``source`` as ``key`` (one PUT, or a multipart upload S3 commits atomically)."""
        path = self._path(key)
        with _local_errors("reading a staged file"):
            size, digest = _hash_file(source) if sha256 is None else (source.stat().st_size, sha256)
        with _s3_errors("storing an artifact", missing=Unavailable("artifact storage bucket not found")):
            self._fs.put_file(str(source), path, chunksize=S3_PART_BYTES, max_concurrency=S3_PART_CONCURRENCY)
        if move:
            source.unlink(missing_ok=True)
        return StoredFile(key, size, digest)

    def get_file(self, key: str, dest: Path) -> None:
        """Download ``key`` to ``dest`` through a temp file in dest's folder and a rename."""
        path = self._path(key)
        with _local_errors("downloading an artifact"):
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
        try:
            with _s3_errors("downloading an artifact"):
                self._fs.get_file(path, str(tmp))
            with _local_errors("downloading an artifact"):
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _info(self, path: str) -> dict[str, Any]:
        with _s3_errors("reading an artifact"):
            info: dict[str, Any] = self._fs.info(path)
        if info.get("type") != "file":
            raise NotFound("artifact not found")
        return info

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes (a HEAD request); NotFound when missing."""
        return int(self._info(self._path(key))["size"])

    def iter_range(self, key: str, start: int = 0, end: int | None = None, chunk: int = COPY_CHUNK) -> Iterator[bytes]:
        """Bytes ``[start, end]`` of ``key`` as ranged GETs of ``chunk`` bytes, pinned to the object's ETag."""
        path = self._path(key)
        with _s3_errors("reading an artifact"):
            fh = self._fs.open(path, "rb", cache_type="none", block_size=chunk)
        try:
            last = _check_range(int(fh.size), start, end, chunk)
        except BaseException:
            fh.close()
            raise
        return _stream(fh, start, last, chunk, lambda: _s3_errors("reading an artifact"))

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object (Unavailable when S3 can't be asked)."""
        try:
            self._info(self._path(key))
        except NotFound:
            return False
        return True

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder ``prefix``; missing is fine, failures are logged."""
        path = self._path(prefix.rstrip("/"))
        try:
            self._fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:  # best effort: s3fs raises OSError, botocore its own tree
            _log.warning("could not delete artifacts under %s: %s", prefix, type(exc).__name__)


@contextlib.contextmanager
def _s3_errors(doing: str, missing: ServiceError | None = None) -> Iterator[None]:
    """Translate s3fs/botocore errors: missing -> NotFound (or ``missing``), no space -> StorageFull, else 503."""
    from botocore.exceptions import BotoCoreError, ClientError
    from s3fs.utils import FileExpired

    try:
        yield
    except ServiceError:
        raise
    except FileExpired as exc:  # the ETag changed between two ranged reads: never mix two versions
        raise Unavailable("the artifact was replaced while it was read; retry") from exc
    except FileNotFoundError as exc:
        raise (missing or NotFound("artifact not found")) from exc
    except PermissionError as exc:
        raise ServiceError(f"artifact storage refused access while {doing}") from exc
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise StorageFull("no space left to store the artifact") from exc
        raise Unavailable(f"artifact storage is unavailable ({doing})") from exc
    except (BotoCoreError, ClientError, TimeoutError) as exc:
        raise Unavailable(f"artifact storage is unavailable ({doing})") from exc
