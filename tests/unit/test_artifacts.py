"""service.storage.artifacts: the local store on real files, the S3 store against a real moto server process.

Behaviour shared by both stores is parametrized over them; atomicity and disk-full faults are
injected into the local store by making one ``os`` call fail (the only mocks here).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import NotFound, RangeNotSatisfiable, ServiceError, StorageFull, Unavailable
from service.storage import artifacts
from service.storage.artifacts import ArtifactStore, LocalStore, StoredFile, check_key, open_store
from service.storage.s3store import S3Store
from tests.s3server import S3Server, dummy_aws_env, s3_server
from tests.tmpfs import small_tmpfs

BUCKET = "slimserve-test"
PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10244 bytes, every offset distinguishable


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """One moto S3 server process for this module, with dummy credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in dummy_aws_env().items():
            mp.setenv(name, value)
        with s3_server() as server:
            server.create_bucket(BUCKET)
            yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """A fresh, empty store of each kind (the S3 one under a unique prefix of the shared bucket)."""
    if request.param == "local":
        return open_store(str(tmp_path / "artifacts"))
    server: S3Server = request.getfixturevalue("s3")
    return open_store(
        f"s3://{BUCKET}/t-{uuid.uuid4().hex}", s3_endpoint_url=server.endpoint_url, staging_dir=tmp_path / "staging"
    )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (unmounted afterwards); skipped where mounting is not allowed."""
    with small_tmpfs(tmp_path / "tiny", "1m") as mount_point:
        yield mount_point


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A local file holding PAYLOAD."""
    path = tmp_path / "source.bin"
    path.write_bytes(PAYLOAD)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder``, relative, sorted (hidden ones included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- both stores -------------------------------------------------------------------------------


def test_put_get_size_exists_round_trip(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    stored = store.put_file("models/m1/uploads/original.onnx", source)
    assert stored == StoredFile("models/m1/uploads/original.onnx", len(PAYLOAD), sha(PAYLOAD))
    assert source.read_bytes() == PAYLOAD  # move=False keeps the source
    assert store.exists("models/m1/uploads/original.onnx")
    assert store.size("models/m1/uploads/original.onnx") == len(PAYLOAD)
    dest = tmp_path / "out" / "copy.onnx"
    store.get_file("models/m1/uploads/original.onnx", dest)
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["copy.onnx"]  # no temp file left beside it


def test_move_consumes_the_source(store: ArtifactStore, tmp_path: Path) -> None:
    staged = store.staging_dir() / "upload.part"
    staged.write_bytes(PAYLOAD)
    stored = store.put_file("models/m1/v1/model.onnx", staged, move=True)
    assert stored.sha256 == sha(PAYLOAD) and stored.size == len(PAYLOAD)
    assert not staged.exists()
    assert b"".join(store.iter_range("models/m1/v1/model.onnx")) == PAYLOAD


def test_a_known_sha256_is_not_recomputed(store: ArtifactStore, source: Path) -> None:
    stored = store.put_file("a/b.bin", source, sha256="f" * 64)
    assert stored.sha256 == "f" * 64
    assert stored.size == len(PAYLOAD)


def test_put_replaces_an_existing_key(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    store.put_file("a/b.bin", source)
    newer = tmp_path / "newer.bin"
    newer.write_bytes(b"second version")
    assert store.put_file("a/b.bin", newer).size == len(b"second version")
    assert b"".join(store.iter_range("a/b.bin")) == b"second version"


RANGES = [  # (start, end, expected)
    (0, None, PAYLOAD),
    (100, None, PAYLOAD[100:]),
    (100, 199, PAYLOAD[100:200]),
    (5, 5, PAYLOAD[5:6]),
    (len(PAYLOAD) - 500, None, PAYLOAD[-500:]),  # a suffix range as the HTTP layer resolves it
    (10_000, 10**9, PAYLOAD[10_000:]),  # an end past the file is clipped
    (len(PAYLOAD) - 1, None, PAYLOAD[-1:]),
]


def test_iter_range(store: ArtifactStore, source: Path) -> None:
    store.put_file("r/data.bin", source)
    for start, end, expected in RANGES:
        chunks = list(store.iter_range("r/data.bin", start, end, chunk=1000))
        assert b"".join(chunks) == expected, (start, end)
        assert all(0 < len(c) <= 1000 for c in chunks), (start, end)


def test_unsatisfiable_ranges_fail_before_any_byte(store: ArtifactStore, source: Path) -> None:
    store.put_file("r/data.bin", source)
    for start, end in [(len(PAYLOAD), None), (10**6, 10**6 + 5), (-1, None), (20, 10)]:
        with pytest.raises(RangeNotSatisfiable):
            store.iter_range("r/data.bin", start, end)  # raised by the call, not on the first next()


def test_a_reader_never_sees_two_versions_mixed(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    store.put_file("a/b.bin", source)
    reader = store.iter_range("a/b.bin", chunk=1024)
    first = next(reader)
    newer = tmp_path / "newer.bin"
    newer.write_bytes(b"N" * len(PAYLOAD))
    store.put_file("a/b.bin", newer)
    if isinstance(store, LocalStore):
        assert first + b"".join(reader) == PAYLOAD  # the open file keeps the old version
    else:
        with pytest.raises(Unavailable, match="replaced"):  # S3 reads are pinned to the first ETag
            b"".join(reader)
    assert b"".join(store.iter_range("a/b.bin")) == b"N" * len(PAYLOAD)


def test_empty_file(store: ArtifactStore, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert store.put_file("e/empty.bin", empty) == StoredFile("e/empty.bin", 0, sha(b""))
    assert store.size("e/empty.bin") == 0
    assert list(store.iter_range("e/empty.bin")) == []
    with pytest.raises(RangeNotSatisfiable):
        store.iter_range("e/empty.bin", 0, 0)


def test_missing_keys(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    store.put_file("models/m1/v1/model.onnx", source)
    assert not store.exists("models/m1/v1/other.onnx")
    assert not store.exists("models/m1/v1")  # a folder is not a key
    with pytest.raises(NotFound):
        store.size("models/m1/v1/other.onnx")
    with pytest.raises(NotFound):
        store.size("models/m1")
    with pytest.raises(NotFound):
        store.iter_range("models/m1/v1/other.onnx")
    dest = tmp_path / "dest.onnx"
    with pytest.raises(NotFound):
        store.get_file("models/m1/v1/other.onnx", dest)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["source.bin"]  # no dest, no temp file


BAD_KEYS = ["", "/abs/path", "a/../b", "..", "a/./b", "a//b", "a\\b", "a/\x00b", "a/.hidden", "a/b/"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_refused_everywhere(store: ArtifactStore, source: Path, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_file(key, source)
    with pytest.raises(ValueError):
        store.get_file(key, tmp_path / "x")
    with pytest.raises(ValueError):
        store.size(key)
    with pytest.raises(ValueError):
        store.iter_range(key)
    with pytest.raises(ValueError):
        store.exists(key)
    if key.rstrip("/") not in ("a/b",):  # "a/b/" names the folder a/b, which is a valid prefix
        with pytest.raises(ValueError):
            store.delete_prefix(key)


def test_delete_prefix(store: ArtifactStore, source: Path) -> None:
    for key in ["models/ab/v1/model.onnx", "models/ab/v2/model.onnx", "models/abc/v1/model.onnx", "other.bin"]:
        store.put_file(key, source)
    store.delete_prefix("models/ab")
    assert not store.exists("models/ab/v1/model.onnx")
    assert not store.exists("models/ab/v2/model.onnx")
    assert store.exists("models/abc/v1/model.onnx")  # a folder prefix, not a string prefix
    assert store.exists("other.bin")
    store.delete_prefix("models/ab/")  # idempotent
    store.delete_prefix("never/written")
    assert store.exists("models/abc/v1/model.onnx")


def test_staging_dir_is_a_local_folder(store: ArtifactStore) -> None:
    staging = store.staging_dir()
    assert staging.is_dir()
    (staging / "probe").write_bytes(b"x")
    assert store.staging_dir() == staging


# ---- open_store ----------------------------------------------------------------------------------


def test_open_store_picks_the_store(tmp_path: Path, s3: S3Server) -> None:
    local = open_store(str(tmp_path / "a"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "a").resolve()
    assert isinstance(open_store(f"file://{tmp_path}/b"), LocalStore)
    remote = open_store("s3://bucket-name/some/prefix/", s3_endpoint_url=s3.endpoint_url)
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.prefix) == ("bucket-name", "some/prefix")
    with pytest.raises(ValueError):
        open_store("s3:///prefix")


def test_check_key_accepts_generated_keys() -> None:
    assert check_key("models/3f2a/uploads/original.onnx") == "models/3f2a/uploads/original.onnx"
    assert check_key("report.json") == "report.json"


# ---- local store: atomicity, durability, faults ----------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


def test_local_staging_is_on_the_store_filesystem_and_move_is_a_rename(local: LocalStore) -> None:
    staging = local.staging_dir()
    assert staging == local.root / ".staging"
    staged = staging / "upload.part"
    staged.write_bytes(PAYLOAD)
    inode = staged.stat().st_ino
    local.put_file("models/m/v1/model.onnx", staged, move=True)
    published = local.root / "models/m/v1/model.onnx"
    assert published.stat().st_ino == inode
    assert published.stat().st_dev == staging.stat().st_dev


def test_local_put_fsyncs_the_file_and_the_folder(
    local: LocalStore, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds: list[str] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    local.put_file("a/b.bin", source)
    assert "file" in kinds and kinds[-1] == "dir"  # the data first, the rename's folder last


@pytest.mark.parametrize("move", [False, True])
def test_local_crash_before_rename_leaves_no_key(
    local: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, move: bool
) -> None:
    old = tmp_path / "old.bin"
    old.write_bytes(b"old")
    local.put_file("a/keep.bin", old)
    staged = local.staging_dir() / "upload.part"
    staged.write_bytes(PAYLOAD)
    seen_at_rename: list[str] = []

    def crashing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen_at_rename.extend(os.listdir(Path(dst).parent))
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(ServiceError) as info:
        local.put_file("a/new.bin", staged, move=move)
    assert info.value.status == 500 and str(tmp_path) not in info.value.message
    with pytest.raises(ServiceError):
        local.put_file("a/keep.bin", staged, move=move)
    monkeypatch.undo()

    if not move:  # the temp file was there, hidden, while it was being renamed
        assert any(name.startswith(".") for name in seen_at_rename)
    assert all(name.startswith(".") or name == "keep.bin" for name in seen_at_rename)
    assert not local.exists("a/new.bin")
    assert b"".join(local.iter_range("a/keep.bin")) == b"old"
    assert files_under(local.root / "a") == ["keep.bin"]  # no temp file left either
    assert staged.read_bytes() == PAYLOAD  # a failed move leaves the staged file to its owner


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_local_disk_full_is_storage_full_with_nothing_left(
    local: LocalStore, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    local.put_file("a/keep.bin", source)
    real_write = os.write
    written = 0

    def filling_write(fd: int, data: bytes | memoryview) -> int:
        nonlocal written
        if written > 4096:
            raise OSError(code, os.strerror(code))
        count = real_write(fd, data[:3000])
        written += count
        return count  # short writes on the way to full

    monkeypatch.setattr(os, "write", filling_write)
    with pytest.raises(StorageFull):
        local.put_file("a/new.bin", source)
    written = 0
    with pytest.raises(StorageFull):
        local.put_file("a/keep.bin", source)
    written = 0
    dest_dir = tmp_path / "downloads"
    with pytest.raises(StorageFull):
        local.get_file("a/keep.bin", dest_dir / "copy.bin")
    monkeypatch.undo()

    assert files_under(local.root / "a") == ["keep.bin"]
    assert not local.exists("a/new.bin")
    assert b"".join(local.iter_range("a/keep.bin")) == PAYLOAD
    assert files_under(dest_dir) == []
    assert local.put_file("a/new.bin", source).size == len(PAYLOAD)  # space is back: it works


def test_local_real_disk_full(tiny_disk: Path, tmp_path: Path) -> None:
    store = LocalStore(tiny_disk / "artifacts")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 << 20))
    with pytest.raises(StorageFull):
        store.put_file("models/m/v1/model.onnx", big)
    assert files_under(store.root) == []
    staged = store.staging_dir() / "upload.part"
    staged.write_bytes(PAYLOAD)
    assert store.put_file("models/m/v1/model.onnx", staged, move=True).sha256 == sha(PAYLOAD)
    assert files_under(store.root) == ["models/m/v1/model.onnx"]


def test_local_move_across_filesystems_falls_back_to_a_copy(
    local: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = tmp_path / "elsewhere.part"
    staged.write_bytes(PAYLOAD)
    real_replace = os.replace

    def cross_device(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src) == staged:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    stored = local.put_file("a/b.bin", staged, move=True)
    assert stored.sha256 == sha(PAYLOAD)
    assert not staged.exists()
    assert (local.root / "a/b.bin").read_bytes() == PAYLOAD


def test_local_errors_hold_no_paths(local: LocalStore, source: Path, tmp_path: Path) -> None:
    blocker = local.root / "a"
    local.root.mkdir(parents=True)
    blocker.write_bytes(b"a file where a folder should be")
    with pytest.raises(ServiceError) as info:
        local.put_file("a/b.bin", source)
    assert str(tmp_path) not in info.value.message and "\n" not in info.value.message


def test_local_delete_prefix_failure_is_logged_not_raised(
    local: LocalStore, source: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    local.put_file("models/m/v1/model.onnx", source)

    def failing_rmtree(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(artifacts.shutil, "rmtree", failing_rmtree)
    local.delete_prefix("models/m")
    assert "could not delete" in caplog.text


# ---- S3 store: service faults ------------------------------------------------------------------------


def test_s3_missing_bucket_is_unavailable(s3: S3Server, source: Path) -> None:
    store = open_store("s3://no-such-bucket/x", s3_endpoint_url=s3.endpoint_url)
    with pytest.raises(Unavailable):
        store.put_file("a/b.bin", source)


@pytest.mark.slow
def test_s3_unreachable_endpoint_is_unavailable(s3: S3Server, source: Path) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_store(f"s3://{BUCKET}/x", s3_endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(Unavailable) as info:
        store.size("a/b.bin")
    assert "127.0.0.1" not in info.value.message


def test_s3_get_file_disk_full_leaves_nothing(
    s3: S3Server, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(f"s3://{BUCKET}/t-{uuid.uuid4().hex}", s3_endpoint_url=s3.endpoint_url)
    store.put_file("a/b.bin", source)
    dest_dir = tmp_path / "downloads"
    dest_dir.mkdir()

    def full_replace(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_replace)
    with pytest.raises(StorageFull):
        store.get_file("a/b.bin", dest_dir / "copy.bin")
    monkeypatch.undo()
    assert files_under(dest_dir) == []
