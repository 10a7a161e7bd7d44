"""Sample data: load a .npz safely and check it against the model (dedupe and split: datasplit.py).

Contract: one ``.npz`` (never unpickled), one array per model input keyed by the input's name,
first axis = samples; an optional ``labels`` array (integers: classification; floats:
regression). Without labels, accuracy means fidelity to the original model's outputs.

What is our own code, and why: ``np.load`` allocates whatever a header declares and reads members
with any zip compression method, so ``load_npz`` reads each member's header with numpy's own
``numpy.lib.format`` parser from a bounded prefix, checks dtype, shape and size against
:class:`DataLimits`, and only then reads exactly the declared bytes (stored or deflated members
only: bzip2/lzma inflate unboundedly inside zipfile).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optimizer.artifact import ModelArtifact, TensorSpec
from optimizer.errors import InvalidData
from optimizer.safezip import ZipLimits, check_zip

LABELS_KEY = "labels"


@dataclass(frozen=True)
class SampleData:
    """Arrays keyed by model input name, all with the same number of samples on axis 0."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()), None)
        return 0 if first is None else int(first.shape[0])

    def take(self, indices: np.ndarray) -> SampleData:
        """The samples at ``indices`` (a copy), labels included."""
        labels = None if self.labels is None else self.labels[indices]
        return SampleData({k: v[indices] for k, v in self.inputs.items()}, labels)

    def head(self, count: int) -> SampleData:
        """The first ``count`` samples."""
        return self.take(np.arange(min(count, len(self))))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for ``session.run``: consecutive slices of ``batch_size`` samples (the last may be short)."""
        for start in range(0, len(self), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """One feed of exactly ``batch_size`` samples, repeating samples when there are fewer."""
        indices = np.arange(batch_size) % max(len(self), 1)
        return {k: v[indices] for k, v in self.inputs.items()}


_log = logging.getLogger(__name__)
_GIB = 1024**3
_HEAD_BYTES = 64 * 1024  # magic, length and numpy's largest accepted header (10 000 chars) fit here
_CHUNK_BYTES = 16 * 1024 * 1024
_ALLOWED_KINDS = "biufcSU"  # bool, integers, floats, complex, bytes, unicode; never objects or structs
_MAX_RANK = 32


class DataLimits(BaseModel):
    """Upper bounds for one sample-data file, all checked before the bytes are read."""

    model_config = ConfigDict(frozen=True)

    max_file_bytes: int = Field(default=_GIB, ge=1)
    max_array_bytes: int = Field(default=_GIB, ge=1)
    max_total_bytes: int = Field(default=_GIB, ge=1)
    max_samples: int = Field(default=1_000_000, ge=1)
    max_arrays: int = Field(default=64, ge=1)
    # A coarse first guard read from the central directory; the exact limits above apply per header.
    zip: ZipLimits = ZipLimits(max_members=1024, max_total_bytes=2 * _GIB)


_DEFAULT_LIMITS = DataLimits()


@dataclass(frozen=True)
class _Member:
    """One archive member whose .npy header passed the checks; its data is not read yet."""

    info: zipfile.ZipInfo
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int
    nbytes: int


def _what(name: str) -> str:
    return "labels" if name == LABELS_KEY else f"input {name!r}"


def error_text(exc: BaseException) -> str:
    """A short, path-free reason for a third-party error."""
    if isinstance(exc, OSError):
        return "read error"
    text = " ".join(str(exc).split())
    return type(exc).__name__ if not text else text[:120]


def load_npz(path: Path, limits: DataLimits = _DEFAULT_LIMITS) -> SampleData:
    """Read a sample-data ``.npz`` without unpickling, refusing anything that breaks ``limits``.

    Raises :class:`InvalidData` with one line for every malformed, unsafe or oversized input.
    """
    with _checked_members(Path(path), limits) as (archive, members):
        arrays = {m.name: _read_data(archive, m) for m in members}
    labels = arrays.pop(LABELS_KEY, None)
    return SampleData(arrays, labels)


def inspect_npz(path: Path, limits: DataLimits = _DEFAULT_LIMITS) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every array's (dtype, shape) after all of :func:`load_npz`'s checks, without reading any data.

    The service calls this at upload time: a bad file is refused before a job is queued.
    """
    with _checked_members(Path(path), limits) as (_archive, members):
        return {m.name: (str(m.dtype), m.shape) for m in members}


@contextlib.contextmanager
def _checked_members(path: Path, limits: DataLimits) -> Iterator[tuple[zipfile.ZipFile, list[_Member]]]:
    """The open archive and its members, every header checked; InvalidData otherwise."""
    try:
        info = path.stat()
        if stat.S_ISREG(info.st_mode):
            path.open("rb").close()  # unreadable files fail here, not with a path in the message
    except OSError as exc:
        raise InvalidData("sample data file cannot be read") from exc
    if not stat.S_ISREG(info.st_mode):
        raise InvalidData("sample data is not a regular file")
    if info.st_size > limits.max_file_bytes:
        raise InvalidData(f"sample data file is {info.st_size} bytes, more than the limit of {limits.max_file_bytes}")
    entries = _named_entries(check_zip(path, limits.zip, InvalidData), limits)
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise InvalidData(f"sample data is not a readable zip archive: {error_text(exc)}") from exc
    with archive:
        members = [_read_header(archive, entry, name, limits) for name, entry in entries]
        _check_members(members, limits)
        yield archive, members


def _named_entries(infos: list[zipfile.ZipInfo], limits: DataLimits) -> list[tuple[str, zipfile.ZipInfo]]:
    """(array name, member) pairs; every member must be a plain ``NAME.npy`` we can inflate safely."""
    if len(infos) > limits.max_arrays:
        raise InvalidData(f"sample data has {len(infos)} arrays, more than the limit of {limits.max_arrays}")
    entries: list[tuple[str, zipfile.ZipInfo]] = []
    seen: set[str] = set()
    for info in infos:
        shown = repr(info.filename[:80])
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise InvalidData(f"archive member {shown} is not an .npy array")
        name = info.filename[: -len(".npy")]
        if not name or any(bad in name for bad in ("/", "\\", "..", "\x00")):
            raise InvalidData(f"archive member {shown} has an invalid array name")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidData(f"archive member {shown} uses an unsupported compression method")
        if name in seen:
            raise InvalidData(f"archive holds array {name!r} twice")
        seen.add(name)
        entries.append((name, info))
    return entries


def _read_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: DataLimits) -> _Member:
    """Parse and check one member's .npy header from a bounded prefix of its stream."""
    what = _what(name)
    try:
        with archive.open(info) as stream:
            head = io.BytesIO(stream.read(_HEAD_BYTES))
    except Exception as exc:
        raise InvalidData(f"{what} cannot be read from the archive: {error_text(exc)}") from exc
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            raise InvalidData(f"{what} uses .npy format version {version}; only 1.0 and 2.0 are read")
    except InvalidData:
        raise
    except Exception as exc:
        raise InvalidData(f"{what} has a malformed .npy header: {error_text(exc)}") from exc
    if dtype.hasobject:
        raise InvalidData(f"{what} holds Python objects; object arrays are refused and never unpickled")
    if dtype.kind not in _ALLOWED_KINDS or dtype.subdtype is not None or dtype.itemsize == 0:
        raise InvalidData(f"{what} has unsupported dtype {str(dtype)[:60]}")
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise InvalidData(f"{what} is a 0-d array; its first axis must count samples")
    if len(shape) > _MAX_RANK:
        raise InvalidData(f"{what} has {len(shape)} dimensions, more than the limit of {_MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidData(f"{what} declares a negative dimension")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if nbytes > limits.max_array_bytes:
        raise InvalidData(f"{what} declares {nbytes} bytes, more than the limit of {limits.max_array_bytes} per array")
    if shape[0] == 0:
        raise InvalidData(f"{what} has no samples")
    if nbytes == 0:
        raise InvalidData(f"{what} is empty (shape {shape})")
    if shape[0] > limits.max_samples:
        raise InvalidData(f"{what} has {shape[0]} samples, more than the limit of {limits.max_samples}")
    offset = head.tell()
    if info.file_size - offset != nbytes:
        raise InvalidData(f"{what} holds {info.file_size - offset} data bytes but its header declares {nbytes}")
    return _Member(info, name, shape, dtype, bool(fortran), offset, nbytes)


def _check_members(members: list[_Member], limits: DataLimits) -> None:
    """Checks across arrays, still before any data is read."""
    if not members:  # a file holding only "labels" is fine for a model whose input is called so
        raise InvalidData("sample data holds no arrays")
    total = sum(m.nbytes for m in members)
    if total > limits.max_total_bytes:
        raise InvalidData(f"sample data declares {total} bytes, more than the limit of {limits.max_total_bytes}")
    first = members[0]
    for member in members[1:]:
        if member.shape[0] != first.shape[0]:
            raise InvalidData(
                f"{_what(member.name)} has {member.shape[0]} samples but {_what(first.name)} has {first.shape[0]}"
            )


def _read_data(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    """Read exactly the declared bytes into a preallocated array (C order, native byte order)."""
    flat = np.empty(member.nbytes // member.dtype.itemsize, dtype=member.dtype)
    buffer = flat.view(np.uint8)
    try:
        with archive.open(member.info) as stream:
            stream.read(member.offset)
            position = 0
            while position < member.nbytes:
                chunk = stream.read(min(_CHUNK_BYTES, member.nbytes - position))
                if not chunk:
                    raise InvalidData(f"{_what(member.name)} is truncated")
                buffer[position : position + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                position += len(chunk)
    except InvalidData:
        raise
    except Exception as exc:
        raise InvalidData(f"{_what(member.name)} cannot be read from the archive: {error_text(exc)}") from exc
    # Fortran order: the bytes are the transpose's C order.
    array = np.ascontiguousarray(flat.reshape(member.shape[::-1]).T) if member.fortran else flat.reshape(member.shape)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def describe_spec(spec: TensorSpec) -> str:
    """``float32[N,16]``: the dtype and shape a model input expects (``N``: dynamic sample axis)."""
    dims = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            dims.append(str(dim))
        else:
            dims.append("N" if axis == 0 else (dim or "?"))
    return f"{spec.dtype}[{','.join(dims)}]"


def validate(data: SampleData, model: ModelArtifact) -> SampleData:
    """Check ``data`` against the model's inputs; returns it with same-kind dtypes cast to the model's.

    Raises :class:`InvalidData` naming the input, what the model expects and what was given.
    """
    inputs = dict(data.inputs)
    labels = data.labels
    names = [spec.name for spec in model.inputs]
    if LABELS_KEY in names and LABELS_KEY not in inputs and labels is not None:
        inputs[LABELS_KEY], labels = labels, None  # the model itself takes an input called "labels"
    for spec in model.inputs:
        if spec.name not in inputs:
            raise InvalidData(f"sample data lacks input {spec.name!r} (expected {describe_spec(spec)})")
    extra = sorted(set(inputs) - set(names))
    if extra:
        shown = ", ".join(repr(name) for name in extra)
        raise InvalidData(f"sample data has arrays the model does not take: {shown}")
    counts = {name: (int(arr.shape[0]) if arr.ndim else 0) for name, arr in inputs.items()}
    if labels is not None:
        counts[LABELS_KEY] = int(labels.shape[0]) if labels.ndim else 0
    first = names[0] if names else None
    for name, count in counts.items():
        if count == 0:
            raise InvalidData(f"{_what(name)} has no samples")
        if first is not None and count != counts[first]:
            raise InvalidData(f"{_what(name)} has {count} samples but {_what(first)} has {counts[first]}")
    checked = {spec.name: _check_input(inputs[spec.name], spec) for spec in model.inputs}
    return SampleData(checked, None if labels is None else _check_labels(labels))


def _check_input(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """One input's dtype (cast within the same kind), rank, fixed dims and finiteness."""
    what = f"input {spec.name!r}"
    cast = False
    if spec.dtype == "str":
        if array.dtype.kind not in "US":
            raise InvalidData(f"{what} has dtype {array.dtype}, expected strings ({describe_spec(spec)})")
    elif array.dtype != (expected := _model_dtype(spec)):
        if array.dtype.kind != expected.kind:
            raise InvalidData(f"{what} has dtype {array.dtype}, expected {expected} ({describe_spec(spec)})")
        if expected.kind in "iu":
            bounds = np.iinfo(expected)
            if array.min() < bounds.min or array.max() > bounds.max:
                raise InvalidData(f"{what} has values outside the range of {expected}")
        with np.errstate(over="ignore", invalid="ignore"):
            array = array.astype(expected)
        cast = True
    # An empty declared shape is how describe_onnx reports an input of unknown rank: accept any.
    if spec.shape and array.ndim != len(spec.shape):
        raise InvalidData(
            f"{what} has shape {tuple(array.shape)}, expected {describe_spec(spec)} (rank {len(spec.shape)})"
        )
    for axis in range(1, array.ndim):
        want = spec.shape[axis] if spec.shape else None
        if isinstance(want, int) and array.shape[axis] != want:
            raise InvalidData(
                f"{what} has shape {tuple(array.shape)}, expected {describe_spec(spec)} (axis {axis} must be {want})"
            )
        if array.shape[axis] < 1:
            raise InvalidData(f"{what} has shape {tuple(array.shape)}: axis {axis} is empty")
    if array.dtype.kind in "fc" and not _all_finite(array):
        beyond = f" or values beyond the range of {array.dtype}" if cast else ""
        raise InvalidData(f"{what} contains NaN or infinite values{beyond}")
    return array


def _model_dtype(spec: TensorSpec) -> np.dtype:
    try:
        return np.dtype(spec.dtype)
    except TypeError as exc:  # e.g. bfloat16: no numpy dtype of that name, no .npy can hold it
        raise InvalidData(f"input {spec.name!r} expects dtype {spec.dtype}, which sample data cannot hold") from exc


def _all_finite(array: np.ndarray) -> bool:
    """``np.isfinite(array).all()`` in slices of samples, so the mask stays small."""
    per_sample = max(1, math.prod(array.shape[1:]))
    step = max(1, (4 * 1024 * 1024) // per_sample)
    return all(bool(np.isfinite(array[start : start + step]).all()) for start in range(0, len(array), step))


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Integer class labels (1-D, >= 0, as int64) or finite float targets (1-D or 2-D)."""
    kind = labels.dtype.kind
    if kind in "iu":
        if labels.ndim != 1:
            raise InvalidData(f"integer labels (classes) must be 1-D, got shape {tuple(labels.shape)}")
        if labels.min() < 0:
            raise InvalidData(f"labels must be class indices >= 0, found {labels.min()}")
        if labels.max() > np.iinfo(np.int64).max:
            raise InvalidData("labels hold class indices too large for int64")
        return labels.astype(np.int64, copy=False)
    if kind == "f":
        if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] < 1):
            raise InvalidData(f"float labels (regression) must be 1-D or 2-D, got shape {tuple(labels.shape)}")
        if not _all_finite(labels):
            raise InvalidData("labels contain NaN or infinite values")
        return labels
    raise InvalidData(f"labels must be integers (classes) or floats (regression), got dtype {labels.dtype}")
