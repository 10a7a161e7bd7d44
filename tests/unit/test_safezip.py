"""Zip bomb guard: limits are checked from the central directory, before anything is inflated."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from optimizer.errors import InvalidData, OptimizerError
from optimizer.safezip import ZipLimits, check_zip


class _Refused(OptimizerError):
    """A caller's own error class: check_zip must raise exactly what it is given."""


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def test_valid_archive_lists_members(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"a.npy": b"1" * 10, "b.npy": b"2" * 20})
    members = check_zip(path, ZipLimits(), _Refused)
    assert [(m.filename, m.file_size) for m in members] == [("a.npy", 10), ("b.npy", 20)]


def test_not_a_zip_raises_the_given_error(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(b"PK\x03\x04 but nothing else that a zip needs")
    with pytest.raises(_Refused, match="not a readable zip archive"):
        check_zip(path, ZipLimits(), _Refused)


def test_unreadable_path_message_holds_no_path(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.zip", tmp_path):
        with pytest.raises(_Refused) as caught:
            check_zip(path, ZipLimits(), _Refused)
        assert str(tmp_path) not in str(caught.value)


def test_unreadable_path_is_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.zip", tmp_path):
        with pytest.raises(_Refused, match="not a readable zip archive"):
            check_zip(path, ZipLimits(), _Refused)


def test_too_many_members(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {f"m{i}.npy": b"x" for i in range(4)})
    assert len(check_zip(path, ZipLimits(max_members=4), _Refused)) == 4
    with pytest.raises(_Refused, match="4 members, more than the limit of 3"):
        check_zip(path, ZipLimits(max_members=3), _Refused)


def test_total_uncompressed_size(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"a.npy": b"a" * 600, "b.npy": b"b" * 600})
    assert check_zip(path, ZipLimits(max_total_bytes=1200), _Refused)
    with pytest.raises(_Refused, match="more than the limit of 1000 bytes"):
        check_zip(path, ZipLimits(max_total_bytes=1000), _Refused)


def test_ratio_bomb_refused(tmp_path: Path) -> None:
    big = b"\0" * (8 * 1024 * 1024)  # deflates about 1000:1
    bomb = _zip(tmp_path / "bomb.zip", {"x.npy": big}, compression=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(_Refused, match=r"'x\.npy' has compression ratio above 200"):
        check_zip(bomb, ZipLimits(), _Refused)
    assert check_zip(bomb, ZipLimits(max_ratio=1e6), _Refused)
    stored = _zip(tmp_path / "stored.zip", {"x.npy": big})
    assert check_zip(stored, ZipLimits(), _Refused)
    small = _zip(tmp_path / "small.zip", {"x.npy": b"\0" * 512 * 1024}, compression=zipfile.ZIP_DEFLATED)
    assert check_zip(small, ZipLimits(), _Refused)  # members under 1 MiB may compress well


def test_encrypted_member_refused(tmp_path: Path) -> None:
    raw = bytearray(_zip(tmp_path / "plain.zip", {"x.npy": b"secret" * 10}).read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.find(signature) + flag_offset
        (flags,) = struct.unpack_from("<H", raw, at)
        struct.pack_into("<H", raw, at, flags | 0x1)
    path = tmp_path / "encrypted.zip"
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidData, match=r"'x\.npy' is encrypted"):
        check_zip(path, ZipLimits(), InvalidData)


def test_only_the_directory_is_read(tmp_path: Path) -> None:
    """A member whose compressed bytes are garbage passes: nothing was inflated."""
    raw = bytearray(_zip(tmp_path / "a.zip", {"x.npy": b"abc" * 1000}, zipfile.ZIP_DEFLATED).read_bytes())
    start = raw.find(b"x.npy") + len(b"x.npy")  # the local header's name, then the deflate stream
    raw[start : start + 8] = b"\xff" * 8
    path = tmp_path / "garbled.zip"
    path.write_bytes(bytes(raw))
    assert [m.filename for m in check_zip(path, ZipLimits(), _Refused)] == ["x.npy"]
    with zipfile.ZipFile(path) as archive, pytest.raises((zipfile.BadZipFile, zlib.error)):
        archive.read("x.npy")  # control: inflating it does fail


def test_bzip2_and_lzma_members_refused(tmp_path: Path) -> None:
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        path = _zip(tmp_path / f"m{method}.zip", {"x.npy": b"x" * 100}, compression=method)
        with pytest.raises(_Refused, match="compression"):
            check_zip(path, ZipLimits(), _Refused)
