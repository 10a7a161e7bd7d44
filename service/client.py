"""A small Python client for the slimserve HTTP API (upload, follow a job, download results).

It wraps :class:`httpx.Client`; httpx's exceptions are translated here into one small tree::

    ClientError
    ├── ApiError(status, message)     the server answered with an error ({"error": "..."})
    ├── ConnectionFailed              no answer: refused, reset, DNS, broken stream
    ├── Timeout                       an HTTP timeout, or ``wait`` ran past its limit
    └── ChecksumMismatch              a download's bytes do not match the server's ETag (sha256)

Retries (with exponential backoff, honouring ``Retry-After`` on 503) are only done for calls that
are safe to repeat: every GET, cancelling a job (idempotent by design), and uploads, which always
carry an ``Idempotency-Key`` (one is generated per :meth:`SlimserveClient.upload` call unless the
caller passes one), so a retried upload returns the same job instead of creating a second one.
A connection that was never established is retried for every call, since nothing was sent.

Downloads stream into a hidden temp file next to the destination (named after the ETag), are
checked against the ETag's sha256, fsynced and renamed; an interrupted download resumes with a
``Range`` request from the partial file, also on a later call. httpx has no resumable, verified
download helper, hence the small loop here.
"""

from __future__ import annotations

import email.utils
import glob
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

#: Job states after which nothing changes any more.
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

_CHUNK = 1 << 20


class ClientError(Exception):
    """Base of every error the client raises."""


class ApiError(ClientError):
    """The server refused the request: ``status`` is the HTTP status, ``message`` its one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ConnectionFailed(ClientError):
    """The server could not be reached, or the connection broke before an answer was complete."""


class Timeout(ClientError):
    """An HTTP request timed out, or a job did not finish within ``wait``'s timeout."""


class ChecksumMismatch(ClientError):
    """A downloaded file's sha256 differs from the server's ETag; the file was discarded."""


class _Retry(Exception):
    """Internal: this attempt may be retried after ``delay`` seconds (None: use the backoff)."""

    def __init__(self, error: ClientError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay


class SlimserveClient:
    """Client of one slimserve server; use it as a context manager (it holds a keep-alive pool).

    ``retries`` is the number of extra attempts for retryable calls, ``backoff`` the first delay in
    seconds (doubled each time, with jitter), ``max_retry_after`` caps a server's ``Retry-After``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        max_retry_after: float = 60.0,
    ) -> None:
        headers = {"User-Agent": "slimserve-client/0.1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_retry_after = max_retry_after

    def __enter__(self) -> SlimserveClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- the API -------------------------------------------------------------------------------

    def upload(self, model: Path, data: Path, config: dict[str, Any], *, idempotency_key: str | None = None) -> dict:
        """Upload a model file and its sample data (both streamed from disk); ``{"model": ..., "job": ...}``.

        ``config`` is the job's options (``name`` required). Retried safely thanks to the
        ``Idempotency-Key`` (a fresh one per call unless given).
        """
        key = idempotency_key or uuid.uuid4().hex
        with Path(model).open("rb") as model_file, Path(data).open("rb") as data_file:
            files = {
                "model": (Path(model).name, model_file, "application/octet-stream"),
                "data": (Path(data).name, data_file, "application/octet-stream"),
            }
            # httpx renders the multipart body lazily from the open files (64 KiB reads) and
            # rewinds them when a retry builds the request again.
            response = self._call(
                "POST",
                "/v1/models",
                retry=True,
                data={"config": json.dumps(config)},
                files=files,
                headers={"Idempotency-Key": key},
            )
        return _json(response)

    def job(self, job_id: str) -> dict:
        """The job's current state (``status``, ``stage``, ``progress``, ``error``, ``version``...)."""
        return _json(self._call("GET", f"/v1/jobs/{_segment(job_id)}", retry=True))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll the job until it is succeeded, failed or cancelled and return it (Timeout past ``timeout`` s).

        ``on_progress`` is called with the job after every poll, the final one included.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.get("status") in FINAL_STATUSES:
                return job
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"job {job_id} did not finish within {timeout:g} s (still {job.get('status')})")
                time.sleep(min(poll, left))
            else:
                time.sleep(poll)

    def cancel(self, job_id: str) -> dict:
        """Cancel a job (queued: at once; running: at its next progress report); returns the job."""
        return _json(self._call("POST", f"/v1/jobs/{_segment(job_id)}/cancel", retry=True))

    def models(self) -> list[dict]:
        """Every model with its versions."""
        return list(_json(self._call("GET", "/v1/models", retry=True)).get("models", []))

    def model(self, name: str) -> dict:
        """One model: ``versions``, ``default_version``, ``latest_job``."""
        return _json(self._call("GET", f"/v1/models/{_segment(name)}", retry=True))

    def delete(self, name: str) -> None:
        """Delete a model with all its versions and artifacts."""
        self._call("DELETE", f"/v1/models/{_segment(name)}", retry=False)

    def health(self) -> dict:
        """``GET /v1/health``."""
        return _json(self._call("GET", "/v1/health", retry=True))

    def download(self, name: str, version: int, filename: str, dest: Path) -> Path:
        """Download one artifact to ``dest`` (a file path, or a folder to put ``filename`` in); returns the path.

        Streamed to a temp file, verified against the ETag (sha256), then renamed into place.
        A partial temp file left by an interrupted call is resumed with a Range request.
        """
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = f"/v1/models/{_segment(name)}/versions/{int(version)}/{_segment(filename)}"
        for attempt in range(self.retries + 1):
            try:
                temp, digest = self._fetch(path, dest)
                break
            except _Retry as retry:
                if attempt >= self.retries:
                    raise retry.error from retry.__cause__
                time.sleep(self._delay(attempt, retry.delay))
        if digest != _etag_of(temp):
            temp.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{filename}: downloaded bytes do not match the server's sha256; discarded")
        os.replace(temp, dest)
        return dest

    # -- internals ------------------------------------------------------------------------------

    def _fetch(self, path: str, dest: Path) -> tuple[Path, str]:
        """One download attempt into ``.<name>.<sha256>.part``; returns the temp file and its sha256."""
        partial = _partials(dest)
        temp = partial[0] if partial else None
        headers: dict[str, str] = {}
        if temp is not None and temp.stat().st_size:  # resume; If-Range: the whole file if it changed since
            headers = {"Range": f"bytes={temp.stat().st_size}-", "If-Range": f'"{_etag_of(temp)}"'}
        with self._stream("GET", path, headers=headers) as response:
            if response.status_code == 416 and temp is not None:  # a stale partial: start over
                _remove(partial)
                raise _Retry(ConnectionFailed("partial download was stale"), delay=0.0)
            self._raise_for_status(response, retry=True)
            etag = _parse_etag(response.headers.get("ETag"))
            start = _range_start(response) if response.status_code == 206 else 0
            hasher = hashlib.sha256()
            if temp is not None and _etag_of(temp) == etag and start == temp.stat().st_size:
                with temp.open("rb") as existing:  # resume: hash what is already there
                    while block := existing.read(_CHUNK):
                        hasher.update(block)
                mode = "ab"
            else:
                _remove(partial)
                if response.status_code == 206:  # a part we cannot use: ask for the whole file
                    raise _Retry(ConnectionFailed("unexpected partial content"), delay=0.0)
                temp, mode = dest.parent / f".{dest.name}.{etag}.part", "wb"
            with temp.open(mode) as out:
                try:
                    for chunk in response.iter_bytes():  # as it arrives: an interruption keeps every byte
                        out.write(chunk)
                        hasher.update(chunk)
                except httpx.TimeoutException as exc:
                    raise _Retry(Timeout("download timed out")) from exc
                except httpx.TransportError as exc:
                    raise _Retry(ConnectionFailed(f"download interrupted: {_one_line(exc)}")) from exc
                out.flush()
                os.fsync(out.fileno())
        return temp, hasher.hexdigest()

    def _call(self, method: str, path: str, *, retry: bool, **kwargs: Any) -> httpx.Response:
        """Send one request (retrying when allowed) and return the successful response; errors raised."""
        for attempt in range(self.retries + 1):
            try:
                response = self._send(method, path, retry=retry, **kwargs)
                self._raise_for_status(response, retry=retry)
                return response
            except _Retry as again:
                if attempt >= self.retries:
                    raise again.error from again.__cause__
                time.sleep(self._delay(attempt, again.delay))
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, method: str, path: str, *, retry: bool, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent: always safe to retry
            error: ClientError = (
                Timeout("timed out connecting to the server")
                if isinstance(exc, httpx.ConnectTimeout)
                else ConnectionFailed(f"cannot connect to the server: {_one_line(exc)}")
            )
            raise _Retry(error) from exc
        except httpx.TimeoutException as exc:
            raise Timeout(f"{method} {path} timed out") from exc
        except httpx.TransportError as exc:
            error = ConnectionFailed(f"connection to the server broke: {_one_line(exc)}")
            if retry:
                raise _Retry(error) from exc
            raise error from exc

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, **kwargs) as response:
                yield response
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retry(ConnectionFailed(f"cannot connect to the server: {_one_line(exc)}")) from exc
        except httpx.TimeoutException as exc:
            raise _Retry(Timeout(f"{method} {path} timed out")) from exc
        except httpx.TransportError as exc:
            raise _Retry(ConnectionFailed(f"connection to the server broke: {_one_line(exc)}")) from exc

    def _raise_for_status(self, response: httpx.Response, *, retry: bool) -> None:
        if response.status_code < 400:
            return
        with suppress(httpx.HTTPError):
            response.read()
        error = ApiError(response.status_code, _error_message(response))
        if response.status_code == 503 and retry:
            raise _Retry(error, _retry_after(response.headers.get("Retry-After"), self.max_retry_after))
        raise error

    def _delay(self, attempt: int, server_delay: float | None) -> float:
        if server_delay is not None:
            return server_delay
        return self.backoff * (2**attempt) * random.uniform(0.75, 1.25)


def _json(response: httpx.Response) -> dict:
    try:
        value = response.json()
    except ValueError as exc:
        raise ClientError(f"the server sent a non-JSON answer (HTTP {response.status_code})") from exc
    if not isinstance(value, dict):
        raise ClientError(f"the server sent an unexpected answer (HTTP {response.status_code})")
    return value


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return _one_line(body["error"])
        if isinstance(body, dict) and isinstance(body.get("detail"), str):  # a framework default
            return _one_line(body["detail"])
    except (ValueError, httpx.ResponseNotRead):
        pass
    return response.reason_phrase or f"HTTP {response.status_code}"


def _retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent/garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), cap)


def _parse_etag(value: str | None) -> str:
    etag = (value or "").strip().removeprefix("W/").strip('"').lower()
    if len(etag) != 64 or any(c not in "0123456789abcdef" for c in etag):
        raise ClientError("the server sent no sha256 ETag; the download cannot be verified")
    return etag


def _range_start(response: httpx.Response) -> int:
    content_range = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _partials(dest: Path) -> list[Path]:
    """Temp files of earlier attempts for ``dest``, newest first."""
    found = [p for p in dest.parent.glob(f".{glob.escape(dest.name)}.*.part") if len(p.name) == len(dest.name) + 71]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _etag_of(temp: Path) -> str:
    return temp.name[-69:-5]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with suppress(OSError):
            path.unlink()


def _segment(value: str) -> str:
    return quote(str(value), safe="")


def _one_line(value: object) -> str:
    text = str(value).strip().splitlines()
    return text[0][:300] if text else type(value).__name__
