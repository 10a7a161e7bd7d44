"""service.uploads: real multipart bodies (httpx's encoder, or written by hand) fed in awkward chunk sizes.

Every error case also checks that the staging folder is left empty. Faults (a full disk) are
injected by making ``os.write`` fail; that is the only mock.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from service.errors import BadRequest, StorageFull, TooLarge
from service.uploads import FLUSH_BYTES, StagedUpload, UploadLimits, receive_upload, sweep_staging
from tests.tmpfs import small_tmpfs

LIMITS = UploadLimits(model_bytes=8 << 20, data_bytes=1 << 20, config_bytes=1024)
MODEL = os.urandom(3 << 20)  # several flushes
DATA = b"PK\x03\x04" + os.urandom(5000)
CONFIG = b'{"name": "digits", "max_accuracy_drop": 0.01}'
BOUNDARY = "b0undary-x"


def encode(files: dict[str, tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type, as httpx (a real client) writes them."""
    request = httpx.Request("POST", "http://test/v1/models", files=files, data=fields or {})
    return request.read(), request.headers["content-type"]


def part(name: str | None, content: bytes, filename: str | None = None, extra: str = "") -> bytes:
    """One hand-written part (``name`` None: no name parameter)."""
    disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + content + b"\r\n"


def body_of(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


HAND_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
GOOD_PARTS = (part("model", b"onnx-bytes", "m.onnx"), part("data", b"npz-bytes", "d.npz"))


async def chunks_of(body: bytes, size: int, consumed: list[int] | None = None) -> AsyncIterator[bytes]:
    """``body`` in ``size``-byte chunks, counting what the receiver pulled into ``consumed``."""
    for start in range(0, len(body), size):
        if consumed is not None:
            consumed.append(min(size, len(body) - start))
        yield body[start : start + size]


def receive(
    body: bytes | AsyncIterator[bytes],
    staging: Path,
    *,
    content_type: str | None = HAND_TYPE,
    content_length: int | None = None,
    chunk: int = 7,
    limits: UploadLimits = LIMITS,
) -> StagedUpload:
    source = chunks_of(body, chunk) if isinstance(body, bytes) else body
    return asyncio.run(
        receive_upload(
            source, content_type=content_type, content_length=content_length, staging_dir=staging, limits=limits
        )
    )


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (unmounted afterwards); skipped where mounting is not allowed."""
    with small_tmpfs(tmp_path / "tiny", "1m") as mount_point:
        yield mount_point


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- success ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "model"),
    [(1, MODEL[:20_000]), (7, MODEL[:300_000]), (64 * 1024, MODEL), (5 << 20, MODEL)],
    ids=["1B", "7B", "64KiB", "whole"],
)
def test_parts_are_staged_with_size_sha_and_head(staging: Path, chunk: int, model: bytes) -> None:
    body, content_type = encode(
        {"model": ("cnn.onnx", model), "data": ("sample.npz", DATA)}, {"config": CONFIG.decode()}
    )
    upload = receive(body, staging, content_type=content_type, content_length=len(body), chunk=chunk)

    assert (upload.model.size, upload.model.sha256, upload.model.head) == (len(model), sha(model), model[:64])
    assert upload.model.path.read_bytes() == model
    assert upload.model.filename == "cnn.onnx"
    assert (upload.data.size, upload.data.sha256, upload.data.head) == (len(DATA), sha(DATA), DATA[:64])
    assert upload.data.path.read_bytes() == DATA
    assert upload.data.filename == "sample.npz"
    assert upload.config == CONFIG
    assert sorted(staging.iterdir()) == sorted([upload.model.path, upload.data.path])
    assert all(p.name.startswith(".upload-") for p in staging.iterdir())
    upload.cleanup()
    assert list(staging.iterdir()) == []


def test_config_is_optional_and_order_is_free(staging: Path) -> None:
    upload = receive(body_of(part("data", DATA, "d.npz"), part("model", b"", "m.onnx")), staging)
    assert upload.config is None
    assert (upload.model.size, upload.model.sha256, upload.model.head) == (0, sha(b""), b"")
    assert upload.data.path.read_bytes() == DATA


def test_file_names_are_informational_and_cleaned(staging: Path) -> None:
    upload = receive(body_of(part("model", b"m", "C:\\Users\\x\\..\\m\u00e9.onnx"), part("data", b"d")), staging)
    assert upload.model.filename == "m\u00e9.onnx"
    assert upload.data.filename is None  # curl -F data=<file sends no filename
    upload = receive(body_of(part("model", b"m", "../../etc/passwd"), part("data", b"d", "")), staging)
    assert upload.model.filename == "passwd"
    assert upload.data.filename is None


def test_writes_are_bounded_buffers_off_the_event_loop(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[int, bool]] = []
    real_write = os.write
    loop_thread = threading.get_ident()

    def watching_write(fd: int, data: bytes | memoryview) -> int:
        writes.append((len(data), threading.get_ident() != loop_thread))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", watching_write)
    body, content_type = encode({"model": ("m.onnx", MODEL), "data": ("d.npz", DATA)})
    upload = receive(body, staging, content_type=content_type, chunk=64 * 1024)
    monkeypatch.undo()
    assert upload.model.path.read_bytes() == MODEL
    assert len(writes) >= len(MODEL) // (FLUSH_BYTES + 64 * 1024)
    assert max(size for size, _ in writes) <= FLUSH_BYTES + 64 * 1024  # never a whole part in memory
    assert all(in_thread for _, in_thread in writes)


# ---- refused before or while reading ---------------------------------------------------------------


def assert_refused(staging: Path, error: type[Exception], body: bytes, **kwargs: object) -> None:
    with pytest.raises(error) as info:
        receive(body, staging, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and str(staging) not in str(info.value)
    assert list(staging.iterdir()) == []  # nothing staged survives
    # and a valid upload works right after
    receive(body_of(*GOOD_PARTS), staging).cleanup()


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "multipart/form-data", "multipart/mixed; boundary=b0undary-x", "text/plain; boundary=x"],
)
def test_not_multipart_form_data(staging: Path, content_type: str | None) -> None:
    assert_refused(staging, BadRequest, body_of(*GOOD_PARTS), content_type=content_type)


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param((part("data", DATA),), id="no-model"),
        pytest.param((part("model", MODEL[:100]), part("config", CONFIG)), id="no-data"),
        pytest.param((*GOOD_PARTS, part("model", b"again")), id="duplicate-model"),
        pytest.param((part("config", b"{}"), *GOOD_PARTS, part("config", b"{}")), id="duplicate-config"),
        pytest.param((*GOOD_PARTS, part("extra", b"x")), id="unknown-part"),
        pytest.param((part(None, b"x"), *GOOD_PARTS), id="no-name"),
        pytest.param((*GOOD_PARTS, part("config", b"{}", extra="Content-Transfer-Encoding: base64\r\n")), id="base64"),
    ],
)
def test_bad_parts(staging: Path, parts: tuple[bytes, ...]) -> None:
    assert_refused(staging, BadRequest, body_of(*parts))


def test_missing_content_disposition(staging: Path) -> None:
    bad = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n".encode()
    assert_refused(staging, BadRequest, body_of(*GOOD_PARTS, bad))


@pytest.mark.parametrize(
    "body",
    [
        b"this is not multipart at all",
        f"--{BOUNDARY}\r\nno colon in this header line\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
        f"--{BOUNDARY}X\r\n".encode() + body_of(*GOOD_PARTS),
        b"",
    ],
    ids=["garbage", "bad-header", "bad-boundary", "empty"],
)
def test_malformed_bodies(staging: Path, body: bytes) -> None:
    assert_refused(staging, BadRequest, body)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99], ids=["in-model", "in-data", "before-closing"])
def test_truncated_stream(staging: Path, cut: float) -> None:
    body = body_of(part("model", MODEL[:200_000], "m.onnx"), part("data", MODEL[:200_000], "d.npz"))
    assert_refused(staging, BadRequest, body[: int(len(body) * cut)], chunk=4096)


def test_client_disconnect_mid_stream(staging: Path) -> None:
    class ClientDisconnect(Exception):
        pass

    async def disconnecting() -> AsyncIterator[bytes]:
        body = body_of(part("model", MODEL, "m.onnx"), part("data", DATA))
        yield body[: 2 << 20]  # more than one flush has been written
        raise ClientDisconnect()

    with pytest.raises(BadRequest) as info:
        receive(disconnecting(), staging)
    assert isinstance(info.value.__cause__, ClientDisconnect)
    assert list(staging.iterdir()) == []


def test_body_longer_than_its_content_length(staging: Path) -> None:
    body = body_of(*GOOD_PARTS)
    assert_refused(staging, BadRequest, body, content_length=len(body) - 10)


def test_cancelled_upload_leaves_nothing(staging: Path) -> None:
    async def main() -> None:
        pulled = asyncio.Event()

        async def stalling() -> AsyncIterator[bytes]:
            yield body_of(part("model", MODEL, "m.onnx"))[: 2 << 20]
            pulled.set()
            await asyncio.Event().wait()  # a client that stops sending

        task = asyncio.create_task(
            receive_upload(stalling(), content_type=HAND_TYPE, content_length=None, staging_dir=staging, limits=LIMITS)
        )
        await pulled.wait()
        assert list(staging.iterdir()) != []  # the model is being staged
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert list(staging.iterdir()) == []


# ---- sizes -----------------------------------------------------------------------------------------


def test_content_length_over_the_limits_is_refused_before_reading(staging: Path) -> None:
    consumed: list[int] = []
    body = body_of(*GOOD_PARTS)
    with pytest.raises(TooLarge):
        receive(chunks_of(body, 7, consumed), staging, content_length=LIMITS.body_bytes + 1)
    assert consumed == []
    assert list(staging.iterdir()) == []


@pytest.mark.parametrize(
    ("parts", "limit"),
    [
        pytest.param((part("model", MODEL, "m.onnx"), part("data", DATA)), 1 << 20, id="model"),
        pytest.param((part("model", b"m"), part("data", MODEL, "d.npz")), 1 << 20, id="data"),
        pytest.param((part("config", b" " * 2000), *GOOD_PARTS), 1024, id="config"),
    ],
)
def test_a_part_over_its_limit_stops_the_upload_at_once(staging: Path, parts: tuple[bytes, ...], limit: int) -> None:
    consumed: list[int] = []
    chunk = 64 * 1024
    limits = UploadLimits(model_bytes=1 << 20, data_bytes=1 << 20, config_bytes=1024)
    with pytest.raises(TooLarge) as info:
        receive(chunks_of(body_of(*parts), chunk, consumed), staging, limits=limits)  # chunked: no Content-Length
    assert str(limit) in str(info.value)
    assert sum(consumed) <= limit + 2 * chunk + 1024  # stopped reading right past the limit
    assert list(staging.iterdir()) == []


def test_a_chunked_body_over_the_total_limit(staging: Path) -> None:
    limits = UploadLimits(model_bytes=1000, data_bytes=1000, config_bytes=10)
    preamble = b"\r\n" * (limits.body_bytes // 2 + 1)  # bytes that belong to no part
    assert_refused(staging, TooLarge, preamble + body_of(*GOOD_PARTS), limits=limits, chunk=4096)


# ---- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_while_staging(staging: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real_write = os.write
    calls = 0

    def filling_write(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_write)
    body, content_type = encode({"model": ("m.onnx", MODEL), "data": ("d.npz", DATA)})
    with pytest.raises(StorageFull):
        receive(body, staging, content_type=content_type, chunk=64 * 1024)
    monkeypatch.undo()
    assert list(staging.iterdir()) == []
    receive(body, staging, content_type=content_type, chunk=64 * 1024).cleanup()  # space is back: it works


def test_real_disk_full_while_staging(tiny_disk: Path) -> None:
    body, content_type = encode({"model": ("m.onnx", MODEL), "data": ("d.npz", DATA)})
    with pytest.raises(StorageFull):
        receive(body, tiny_disk, content_type=content_type, chunk=64 * 1024)
    assert list(tiny_disk.iterdir()) == []
    receive(body_of(*GOOD_PARTS), tiny_disk).cleanup()  # a small upload still fits
    assert list(tiny_disk.iterdir()) == []


def test_staged_file_creation_failing_is_one_clean_line(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    real_mkstemp = tempfile.mkstemp
    made = 0

    def mkstemp_then_out_of_inodes(*args: object, **kwargs: object) -> tuple[int, str]:
        nonlocal made
        made += 1
        if made > 1:  # the model file is created, the data file is not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_out_of_inodes)
    with pytest.raises(StorageFull):
        receive(body_of(*GOOD_PARTS), staging)
    monkeypatch.undo()
    assert list(staging.iterdir()) == []


def test_a_stalled_upload_is_cut_off_and_leaves_nothing(staging: Path) -> None:
    body = body_of(*GOOD_PARTS)

    async def stalling() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        await asyncio.sleep(30)  # the client stops sending
        yield body[len(body) // 2 :]

    limits = UploadLimits(model_bytes=LIMITS.model_bytes, data_bytes=LIMITS.data_bytes, idle_seconds=0.3)
    with pytest.raises(BadRequest, match="stalled"):
        receive(stalling(), staging, limits=limits)
    assert list(staging.iterdir()) == []
    receive(body_of(*GOOD_PARTS), staging).cleanup()


def test_sweep_staging_removes_only_dead_upload_parts(tmp_path: Path) -> None:
    """Parts untouched for twice the idle timeout go; fresh parts, other files and folders stay."""
    staging = tmp_path / ".staging"
    staging.mkdir()
    dead, fresh, other = staging / ".upload-a.model", staging / ".upload-b.data", staging / "keep.txt"
    for path in (dead, fresh, other):
        path.write_bytes(b"x")
    (staging / ".upload-dir").mkdir()
    old = time.time() - 130
    os.utime(dead, (old, old))
    os.utime(other, (old, old))
    assert sweep_staging(staging, idle_seconds=60) == 1
    assert not dead.exists() and fresh.exists() and other.exists() and (staging / ".upload-dir").is_dir()
    assert sweep_staging(tmp_path / "missing", idle_seconds=60) == 0
