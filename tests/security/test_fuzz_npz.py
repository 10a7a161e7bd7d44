"""Property-based fuzzing of the sample-data ``.npz`` reader (``optimizer/data.py``, ``optimizer/safezip.py``).

hypothesis writes files to disk and hands them to ``load_npz`` and ``inspect_npz``: arbitrary bytes,
valid archives whose members are mutated (magic, format version, ``.npy`` headers with huge,
negative or non-integer shapes, ``fortran_order`` tricks, object and structured dtypes, truncated
or padded data, extra members, names with ``../`` or NUL, duplicate names, zero-size arrays,
NaN/Inf) and zip-bomb shapes (a declared uncompressed size far above the limit, a high ratio).
The property: the arrays load and match their headers (and what ``np.load(allow_pickle=False)``
reads), or the reader raises ``InvalidData`` (a 400 at the API) with one line that shows no temp
path; never another exception, never unpickling. One end-to-end test uploads such files to a
real ``slimserve serve``.

Every ``@settings`` here has ``derandomize=True``: CI runs the same examples on every run, so a
failure is reproducible from the log alone.
"""

from __future__ import annotations

import io
import itertools
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from optimizer.data import inspect_npz, load_npz
from optimizer.errors import InvalidData
from tests.builders import mlp_data, mlp_onnx
from tests.e2e.conftest import assert_error, job_config, serving, stray_files, upload
from tests.serverproc import Proc

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # reproducible in CI: the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
#: Where hypothesis' files go: one folder for the module (made by the fixture below, not at import),
#: each example overwrites the same file.
_SCRATCH: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    _SCRATCH.append(tmp_path_factory.mktemp("fuzz-npz"))
    yield
    _SCRATCH.clear()


def scratch() -> Path:
    """This module's scratch folder."""
    return _SCRATCH[0]


def assert_clean(message: str, folder: Path) -> None:
    """One non-empty line naming no temp path."""
    assert message.strip() and "\n" not in message, message
    assert str(folder) not in message and "/tmp" not in message and "Traceback" not in message, message
    assert len(message) < 600, message


def check(raw: bytes, folder: Path | None = None) -> bool:
    """Write ``raw`` as a .npz and read it: True when it loads (and matches its headers), False for a clean
    InvalidData; any other exception escapes and fails the test."""
    folder = folder or scratch()
    path = folder / "data.npz"
    path.write_bytes(raw)
    try:
        headers = inspect_npz(path)
    except InvalidData as exc:
        assert_clean(str(exc), folder)
        with pytest.raises(InvalidData):  # the full reader refuses what the upload check refuses
            load_npz(path)
        return False
    try:
        data = load_npz(path)
    except InvalidData as exc:  # data the headers could not show: truncated or corrupt deflate streams
        assert_clean(str(exc), folder)
        return False
    arrays = dict(data.inputs)
    if data.labels is not None:
        arrays["labels"] = data.labels
    assert set(arrays) == set(headers)
    with np.load(path, allow_pickle=False) as reference:
        for name, array in arrays.items():
            dtype, shape = headers[name]
            assert array.shape == shape
            assert array.dtype.newbyteorder("=") == np.dtype(dtype).newbyteorder("=")
            assert array.dtype.isnative and array.flags.c_contiguous
            want = reference[name]
            assert want.shape == array.shape
            assert np.array_equal(array, want, equal_nan=array.dtype.kind in "fc")
    return True


# --------------------------------------------------------------------------- building archives


def npy(array: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.lib.format.write_array(out, array, version=version, allow_pickle=False)
    return out.getvalue()


def npy_with_header(header: str, data: bytes, version: int = 1) -> bytes:
    """A .npy member with a hand-written header dict (padded as numpy pads it)."""
    text = header.encode("latin-1")
    prefix = 10 if version == 1 else 12
    pad = (-(prefix + len(text) + 1)) % 64
    text += b" " * pad + b"\n"
    length = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + length + text + data


def archive(members: list[tuple[str, bytes, int]]) -> bytes:
    """A zip of (name, bytes, compression) members; duplicate names are written as given."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w") as zf:
            for name, payload, method in members:
                info = zipfile.ZipInfo(name)
                info.compress_type = method
                zf.writestr(info, payload)
    return out.getvalue()


_DTYPES = ["<f4", ">f4", "<f8", "<f2", "<i1", "<i8", ">i4", "<u2", "|b1", "<c8", "|S3", "<U2"]


@st.composite
def arrays(draw: st.DrawFn, rows: int) -> np.ndarray:
    """A small valid array of an accepted dtype, NaN/Inf included, C or Fortran order."""
    from hypothesis.extra import numpy as npst

    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = (rows, *draw(st.lists(st.integers(0, 3), max_size=2)))
    array = draw(npst.arrays(dtype, shape))
    return np.asfortranarray(array) if draw(st.booleans()) else array


#: Header dicts a client can write: huge, negative, non-integer shapes; fortran_order tricks; objects, structs.
BAD_HEADERS = [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 4), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 0), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "1, " * 40 + "), }",
    "{'descr': '<f4', 'fortran_order': 'yes', 'shape': (2,), }",
    "{'descr': '<f4', 'fortran_order': 1, 'shape': (2, 2), }",
    "{'descr': '<f4', 'fortran_order': True, 'shape': (9223372036854775807, 2), }",
    "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
    "{'descr': [('a', '<i4'), ('b', '|O')], 'fortran_order': False, 'shape': (2,), }",
    "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (2,), }",
    "{'descr': '|V8', 'fortran_order': False, 'shape': (2,), }",
    "{'descr': '<M8[s]', 'fortran_order': False, 'shape': (2,), }",
    "{'descr': ('<f4', (2,)), 'fortran_order': False, 'shape': (2,), }",
    "{'descr': '<U0', 'fortran_order': False, 'shape': (2,), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}",
    "{'descr': '<f4', 'shape': (2,)}",
    "[1, 2, 3]",
    "{'descr': __import__('os').system('true'), 'fortran_order': False, 'shape': (2,)}",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), " + "'x' * 99999" + "}",
]
NAMES = ["../x.npy", "/abs.npy", "a/b.npy", "a\\b.npy", "n\x00ul.npy", "x.txt", "dir/", ".npy", "x.NPY", "é.npy"]


@st.composite
def member_bytes(draw: st.DrawFn, rows: int) -> bytes:
    """One member's bytes: a valid .npy, or one with its magic, version, header or data mutated."""
    good = npy(draw(arrays(rows)), draw(st.sampled_from([(1, 0), (1, 0), (2, 0)])))
    move = draw(st.sampled_from(["none"] * 4 + ["magic", "version", "header", "truncate", "pad", "flip", "junk"]))
    if move == "magic":
        return draw(st.binary(min_size=6, max_size=6)) + good[6:]
    if move == "version":
        return good[:6] + bytes(draw(st.sampled_from([[3, 0], [0, 0], [255, 255], [2, 1]]))) + good[8:]
    if move == "header":
        header = draw(st.sampled_from(BAD_HEADERS))
        return npy_with_header(header, draw(st.binary(max_size=64)), draw(st.sampled_from([1, 2])))
    if move == "truncate":
        return good[: draw(st.integers(0, max(len(good) - 1, 0)))]
    if move == "pad":
        return good + draw(st.binary(min_size=1, max_size=16))
    if move == "flip":
        at = draw(st.integers(0, len(good) - 1))
        return good[:at] + bytes([good[at] ^ draw(st.integers(1, 255))]) + good[at + 1 :]
    if move == "junk":
        return draw(st.binary(max_size=128))
    return good


@st.composite
def npz_files(draw: st.DrawFn) -> bytes:
    """An archive of 1 to 3 members with mostly valid names and contents, each part mutated now and then."""
    rows = draw(st.integers(1, 3))
    count = draw(st.integers(1, 3))
    members: list[tuple[str, bytes, int]] = []
    for index in range(count):
        name = draw(st.sampled_from([f"in{index}.npy"] * 6 + ["labels.npy", "in0.npy", *NAMES]))
        rows_here = rows if draw(st.integers(0, 7)) else rows + 1
        method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
        members.append((name, draw(member_bytes(rows_here)), method))
    raw = archive(members)
    if draw(st.integers(0, 9)) == 0:  # cut the archive itself, or flip a byte of its directory
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


# --------------------------------------------------------------------------- in-process fuzzing


@FUZZ
@given(raw=st.binary(max_size=300) | st.just(b"PK\x05\x06" + bytes(18)) | st.just(b"PK\x03\x04" + bytes(40)))
def test_arbitrary_bytes_are_refused_cleanly(raw: bytes) -> None:
    """Any bytes as a .npz (empty archives and bare zip signatures among them): a clean InvalidData."""
    assert not check(raw)


@FUZZ
@given(raw=npz_files())
@example(raw=archive([("x.npy", npy_with_header(BAD_HEADERS[1], b""), zipfile.ZIP_STORED)]))
@example(raw=archive([("x.npy", npy_with_header(BAD_HEADERS[-2], b""), zipfile.ZIP_STORED)]))
def test_mutated_archives_load_as_declared_or_are_refused(raw: bytes) -> None:
    """Valid archives with mutated members: wrong magic or version, headers with huge (product past 2**63),
    negative or non-integer shapes, fortran_order tricks, object / structured / void / datetime dtypes, code in
    the header dict, truncated, padded or bit-flipped data, extra members, names with ``../``, ``/``, ``\\``,
    NUL, duplicates, zero-size arrays, NaN/Inf. Each loads exactly as its header says or is one clean line.

    CVE-2019-6446 (numpy: ``np.load`` unpickled object arrays by default, arbitrary code): headers are parsed
    with numpy's literal parser, never evaluated or unpickled.
    """
    check(raw)


def test_the_archive_fuzzer_reaches_both_outcomes() -> None:
    """The archive strategy is not vacuous: some files load and some are refused."""
    outcomes: set[bool] = set()

    @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(raw=npz_files())
    def run(raw: bytes) -> None:
        outcomes.add(check(raw))

    run()
    assert outcomes == {True, False}


class _Canary:
    """Unpickling this creates the file at ``path``: an object array holding one is a pickle bomb."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    wrap=st.sampled_from(["plain", "structured", "fortran", "renamed-labels"]),
    method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
)
def test_object_members_are_never_unpickled(wrap: str, method: int) -> None:
    """A pickle canary: object-dtype members (plain, in a struct field, Fortran order, named ``labels``) whose
    unpickling would create a file are refused and the file stays absent.

    CVE-2019-6446 (numpy ``np.load`` allow_pickle default) and CVE-2025-32434 (PyTorch ``torch.load`` with
    ``weights_only=True`` still reachable by pickle): sample data is never unpickled at all.
    """
    folder = Path(tempfile.mkdtemp(prefix="canary-", dir=scratch()))
    canary = folder / "canary"
    payload = np.empty(2, dtype=object)
    payload[:] = [_Canary(canary), 1]
    if wrap == "structured":
        record = np.empty(2, dtype=[("a", "<i4"), ("b", object)])
        record["b"] = payload
        payload = record
    if wrap == "fortran":
        payload = np.asfortranarray(np.array([[_Canary(canary)] * 2] * 2, dtype=object))
    out = io.BytesIO()
    np.lib.format.write_array(out, payload, allow_pickle=True)
    name = "labels.npy" if wrap == "renamed-labels" else "x.npy"
    raw = archive([(name, out.getvalue(), method), ("y.npy", npy(np.zeros((2, 3), np.float32)), method)])
    assert not canary.exists()
    assert not check(raw, folder)
    assert not canary.exists(), "an object member was unpickled"


@settings(max_examples=20, deadline=None, derandomize=True)
@given(declared=st.integers(2**31 + 1, 2**32 - 1), at_member=st.booleans())
def test_a_declared_size_far_above_the_limit_is_refused_from_the_directory(declared: int, at_member: bool) -> None:
    """Zip-bomb shape: a member whose central directory declares gigabytes (2 GiB past the 2 GiB limit) is refused
    from the directory alone, before anything is inflated.

    CVE-2024-0450 (CPython zipfile: overlapping-entry "quoted-overlap" zip bombs): sizes are read from the
    directory and bounded before inflating.
    """
    raw = bytearray(archive([("x.npy", npy(np.zeros((4, 4), np.float32)), zipfile.ZIP_DEFLATED)]))
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, declared)  # uncompressed size in the central directory
    if at_member:
        struct.pack_into("<I", raw, 22, declared)  # and in the local header
    assert not check(bytes(raw))


@pytest.mark.parametrize("megabytes", [4, 24])
def test_a_high_compression_ratio_is_refused(megabytes: int) -> None:
    """Zip-bomb shape: a deflated member of zeros whose ratio is about 1000:1 is refused by the ratio check,
    whatever its .npy header says (CVE-2024-0450 class: inflate bounds come from the directory)."""
    zeros = npy(np.zeros((megabytes * 1024 * 256,), np.float32))
    assert not check(archive([("x.npy", zeros, zipfile.ZIP_DEFLATED)]))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path, Path]]:
    """A real server (no worker: accepted uploads just queue) and the tiny MLP model file."""
    folder = tmp_path_factory.mktemp("fuzz-npz")
    mlp_onnx(folder / "mlp.onnx")
    mlp_data(folder / "mlp.npz")
    home = folder / "home"
    with serving(home, run_worker="false", drain_seconds="0") as proc:
        yield proc, home, folder


_NAMES = itertools.count()


@pytest.mark.slow
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=npz_files() | st.binary(max_size=200))
@example(raw=archive([("x.npy", npy_with_header(BAD_HEADERS[1], b""), zipfile.ZIP_STORED)]))
def test_http_turns_fuzzed_npz_into_400(upload_server: tuple[Proc, Path, Path], raw: bytes) -> None:
    """``POST /v1/models`` with a fuzzed .npz: 202 when it is valid, else a 400 with a one-line ``{"error": ...}``
    that leaks no path, never a 500 or a hang (explicit timeouts); no staged file is left; a valid upload right
    after is accepted."""
    proc, home, folder = upload_server
    model = folder / "mlp.onnx"
    response = upload(proc.url, model, raw, job_config(f"fz{next(_NAMES)}"), timeout=60)
    if response.status_code != 202:
        message = assert_error(response, 400, home)
        assert str(folder) not in message
    assert stray_files(home) == []
    good = upload(proc.url, model, folder / "mlp.npz", job_config(f"ok{next(_NAMES)}"), timeout=60)
    assert good.status_code == 202, good.text
