"""Deduplicate and split sample data, and cache the split.

Deduplication compares each sample's raw bytes exactly with ``np.unique`` over byte rows
(vectorised, and unlike a hash it cannot collide). Stratified splitting is a few lines of integer
apportioning on top of a ``default_rng`` permutation; scikit-learn's splitters refuse the small
and capped splits we need. The split's indices are cached (keyed by the data file's sha256, the
model's input spec, the seed and the fraction) so every candidate and every retry of a job is
measured on the same samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimizer.artifact import ModelArtifact
from optimizer.data import DataLimits, SampleData, error_text, load_npz, validate
from optimizer.errors import InvalidConfig, InvalidData

_MIN_DISJOINT = 4  # below this many samples calibration and validation are both the whole set
_MAX_CALIBRATION = 512
_MAX_VALIDATION = 4096
_CACHE_VERSION = 1
_DEFAULT_LIMITS = DataLimits()

_log = logging.getLogger(__name__)


def _first_occurrences(data: SampleData) -> np.ndarray:
    """Sorted indices of each sample's first occurrence, comparing the raw bytes of every input."""
    count = len(data)
    if count == 0:
        return np.arange(0)
    ids: list[np.ndarray] = []
    for array in data.inputs.values():
        rows = np.ascontiguousarray(array).reshape(count, -1)
        width = rows.shape[1] * rows.dtype.itemsize
        if width == 0:
            continue
        keys = rows.view(np.dtype((np.void, width))).reshape(count)
        ids.append(np.unique(keys, return_inverse=True)[1].reshape(count))
    if not ids:
        return np.arange(min(count, 1))
    combined = ids[0] if len(ids) == 1 else np.stack(ids, axis=1)
    first = np.unique(combined, axis=0, return_index=True)[1]  # stable sort: first occurrence
    return np.sort(first)


def deduplicate(data: SampleData) -> tuple[SampleData, int]:
    """Drop exact duplicate samples (same bytes in every input), keeping first occurrences in order.

    Labels follow their samples; returns the data and how many samples were dropped.
    """
    keep = _first_occurrences(data)
    dropped = len(data) - len(keep)
    return (data if dropped == 0 else data.take(keep)), dropped


@dataclass(frozen=True)
class DataSplit:
    """Calibration and validation samples drawn from one (deduplicated) data set.

    ``total_samples`` counts the samples before deduplication. ``disjoint`` is False only when
    fewer than 4 unique samples exist: then both splits are the whole set.
    """

    calibration: SampleData
    validation: SampleData
    duplicates_dropped: int
    total_samples: int
    seed: int
    disjoint: bool = True


def _check_split_args(fraction: float, max_calibration: int, max_validation: int) -> None:
    if not 0.0 < fraction < 1.0:
        raise InvalidConfig(f"calibration_fraction must be between 0 and 1 (exclusive), got {fraction}")
    if max_calibration < 1 or max_validation < 1:
        raise InvalidConfig("max_calibration and max_validation must be at least 1")


def _apportion(total: int, capacities: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``capacities`` (largest remainder), each <= its cap."""
    capacity = int(capacities.sum())
    total = min(total, capacity)
    if capacity == 0:
        return np.zeros_like(capacities)
    shares = total * capacities // capacity
    remainders = total * capacities % capacity
    extra = total - int(shares.sum())
    shares[np.argsort(-remainders, kind="stable")[:extra]] += 1
    return shares


def _split_indices(
    labels: np.ndarray | None, count: int, seed: int, fraction: float, max_cal: int, max_val: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint calibration and validation indices (both ``arange(count)`` under 4 samples)."""
    if count < _MIN_DISJOINT:
        everything = np.arange(count)
        return everything, everything
    order = np.random.default_rng(seed).permutation(count)
    n_cal = min(max(1, round(count * fraction)), count - 1, max_cal)
    groups = None
    if labels is not None and labels.dtype.kind in "iu" and labels.ndim == 1:
        sizes = np.unique(labels, return_counts=True)[1]
        if sizes.min() >= 2:
            by_class = order[np.argsort(labels[order], kind="stable")]
            groups = np.split(by_class, np.cumsum(sizes)[:-1])
    if groups is None:
        n_val = min(count - n_cal, max_val)
        return np.sort(order[:n_cal]), np.sort(order[n_cal : n_cal + n_val])
    sizes = sizes.astype(np.int64)
    cal_share = _apportion(n_cal, sizes - 1)
    val_share = _apportion(min(count - int(cal_share.sum()), max_val), sizes - cal_share)
    cal = np.concatenate([g[:c] for g, c in zip(groups, cal_share, strict=True)])
    val = np.concatenate([g[c : c + v] for g, c, v in zip(groups, cal_share, val_share, strict=True)])
    return np.sort(cal), np.sort(val)


def split(
    data: SampleData,
    seed: int = 0,
    calibration_fraction: float = 0.3,
    max_calibration: int = _MAX_CALIBRATION,
    max_validation: int = _MAX_VALIDATION,
) -> DataSplit:
    """Split into calibration and validation samples, deterministically for a given ``seed``.

    Stratified by class when the labels are integers and every class has at least 2 samples.
    Calibration takes ``calibration_fraction`` (at most ``max_calibration``), validation the rest
    (at most ``max_validation``); the two never overlap unless there are fewer than 4 samples.
    """
    _check_split_args(calibration_fraction, max_calibration, max_validation)
    if len(data) == 0:
        raise InvalidData("sample data has no samples")
    cal, val = _split_indices(data.labels, len(data), seed, calibration_fraction, max_calibration, max_validation)
    return DataSplit(data.take(cal), data.take(val), 0, len(data), seed, len(data) >= _MIN_DISJOINT)


def prepare(
    path: Path,
    model: ModelArtifact,
    *,
    seed: int = 0,
    calibration_fraction: float = 0.3,
    limits: DataLimits = _DEFAULT_LIMITS,
    cache_dir: Path | None = None,
) -> DataSplit:
    """Load, validate, deduplicate and split a sample-data file for ``model``.

    With ``cache_dir``, the chosen indices are cached under a key made of the file's sha256, the
    model's input spec, the seed and the fraction, so a second call skips deduplication and
    splitting and returns identical samples. A corrupt cache entry is ignored and rewritten.
    """
    _check_split_args(calibration_fraction, _MAX_CALIBRATION, _MAX_VALIDATION)
    path = Path(path)
    data = validate(load_npz(path, limits), model)
    total = len(data)
    entry = None
    if cache_dir is not None:
        entry = Path(cache_dir) / f"split-{_cache_key(path, model, seed, calibration_fraction)}.npz"
        cached = _read_cache(entry, total)
        if cached is not None:
            cal, val, dropped = cached
            return DataSplit(data.take(cal), data.take(val), dropped, total, seed, _disjoint(cal, val))
    keep = _first_occurrences(data)
    unique_labels = None if data.labels is None else data.labels[keep]
    cal_u, val_u = _split_indices(
        unique_labels, len(keep), seed, calibration_fraction, _MAX_CALIBRATION, _MAX_VALIDATION
    )
    cal, val = keep[cal_u], keep[val_u]
    dropped = total - len(keep)
    if entry is not None:
        _write_cache(entry, cal, val, dropped, total)
    return DataSplit(data.take(cal), data.take(val), dropped, total, seed, len(keep) >= _MIN_DISJOINT)


def _disjoint(cal: np.ndarray, val: np.ndarray) -> bool:
    return not np.intersect1d(cal, val).size


def _cache_key(path: Path, model: ModelArtifact, seed: int, fraction: float) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    spec = [[s.name, s.dtype, [str(d) for d in s.shape]] for s in model.inputs]
    key = {
        "version": _CACHE_VERSION,
        "data_sha256": digest.hexdigest(),
        "inputs": spec,
        "seed": seed,
        "fraction": repr(float(fraction)),
        "max_calibration": _MAX_CALIBRATION,
        "max_validation": _MAX_VALIDATION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(entry: Path, total: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The cached (calibration, validation, dropped), or None when absent or not trustworthy."""
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as stored:
            cal, val, meta = stored["calibration"], stored["validation"], stored["meta"]
        dropped, cached_total = (int(v) for v in meta)
        for indices in (cal, val):
            if indices.ndim != 1 or indices.dtype.kind not in "iu" or len(indices) == 0:
                raise ValueError("bad indices")
            if indices.min() < 0 or indices.max() >= total or np.any(np.diff(indices) <= 0):
                raise ValueError("indices out of order or range")
        if cached_total != total or not 0 <= dropped < total:
            raise ValueError("counts do not match the data")
        if total - dropped >= _MIN_DISJOINT and not _disjoint(cal, val):
            raise ValueError("splits overlap")
    except Exception as exc:  # a cache is only a shortcut: anything odd means recompute
        _log.warning("ignoring corrupt data-split cache entry %s: %s", entry.name, error_text(exc))
        return None
    return cal.astype(np.int64), val.astype(np.int64), dropped


def _write_cache(entry: Path, cal: np.ndarray, val: np.ndarray, dropped: int, total: int) -> None:
    """Write the entry atomically (temp file, fsync, rename); a failure only loses the shortcut."""
    temp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with temp.open("wb") as handle:
            np.savez(handle, calibration=cal, validation=val, meta=np.array([dropped, total], np.int64))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, entry)
    except OSError as exc:
        _log.warning("could not write data-split cache entry %s: %s", entry.name, error_text(exc))
        temp.unlink(missing_ok=True)
