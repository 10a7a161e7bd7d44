"""Zip bomb guard for the zip-based formats we accept (.npz, TorchScript .pt, torch.export .pt2).

Checks member count, total uncompressed size and compression ratio from the central directory,
before anything is inflated. The standard library's zipfile reads only the directory here.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from optimizer.errors import OptimizerError


class ZipLimits(BaseModel):
    """Upper bounds for one archive."""

    model_config = ConfigDict(frozen=True)

    max_members: int = 10_000
    max_total_bytes: int = 8 * 1024**3
    max_ratio: float = 200.0  # uncompressed / compressed, per member; stored members have ratio 1


def check_zip(path: Path, limits: ZipLimits, error: type[OptimizerError]) -> list[zipfile.ZipInfo]:
    """The archive's members after checking the limits; raises ``error`` with one line otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        # The message names no path: it may reach an HTTP client.
        raise error(f"not a readable zip archive ({type(exc).__name__})") from exc
    if len(members) > limits.max_members:
        raise error(f"archive has {len(members)} members, more than the limit of {limits.max_members}")
    total = 0
    for info in members:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # zipfile inflates bzip2 / lzma members without a size cap: refuse them outright.
            raise error(f"archive member {info.filename!r} uses an unsupported compression method")
        if info.flag_bits & 0x1:
            raise error(f"archive member {info.filename!r} is encrypted")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise error(f"archive inflates to more than the limit of {limits.max_total_bytes} bytes")
        if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise error(f"archive member {info.filename!r} has compression ratio above {limits.max_ratio:g}")
    return members
