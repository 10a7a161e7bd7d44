"""Sample data: safe .npz loading, validation against a real ONNX model, dedupe, split, cache."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer import datasplit as data_module
from optimizer.artifact import ModelArtifact
from optimizer.data import LABELS_KEY, DataLimits, SampleData, load_npz, validate
from optimizer.datasplit import deduplicate, prepare, split
from optimizer.errors import InvalidConfig, InvalidData
from optimizer.io import describe_onnx
from tests import builders

# ---------------------------------------------------------------- helpers


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _header(text: str, version: tuple[int, int] = (1, 0)) -> bytes:
    """A hand-written .npy header (magic, length, dict text padded to 64 bytes)."""
    body = text.encode("latin1")
    length_format = "<H" if version == (1, 0) else "<I"
    prefix = 8 + struct.calcsize(length_format)
    body += b" " * ((64 - (prefix + len(body) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(length_format, len(body)) + body


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def _savez(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _identity_model(path: Path, elem_type: int, shape: list[int | str], name: str = "x") -> ModelArtifact:
    """A one-node model ``name -> Identity -> y`` with the given input type and shape."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], ["y"])],
        "identity",
        [helper.make_tensor_value_info(name, elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return describe_onnx(path)


@pytest.fixture
def mlp(mlp_model: Path) -> ModelArtifact:
    """The MLP's interface: ``x: float32[batch, 16]``."""
    return describe_onnx(mlp_model)


def _x(samples: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(samples, 16)).astype(np.float32)


# ---------------------------------------------------------------- load_npz


@pytest.mark.parametrize("compressed", [False, True])
def test_load_round_trip(tmp_path: Path, compressed: bool) -> None:
    x, labels = _x(20), np.arange(20) % 4
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, labels=labels)
    loaded = load_npz(path)
    assert list(loaded.inputs) == ["x"]
    np.testing.assert_array_equal(loaded.inputs["x"], x)
    assert loaded.labels is not None
    np.testing.assert_array_equal(loaded.labels, labels)
    assert len(loaded) == 20


def test_load_fortran_order_and_big_endian(tmp_path: Path) -> None:
    x = np.asfortranarray(_x(6)).astype(">f4", order="F")
    assert x.flags.f_contiguous and not x.flags.c_contiguous
    path = _zip(tmp_path / "d.npz", {"x.npy": _npy(x)})
    loaded = load_npz(path).inputs["x"]
    np.testing.assert_array_equal(loaded, x)
    assert loaded.dtype.isnative and loaded.flags.c_contiguous


class _Canary:
    """Unpickling this writes a file: proof that a payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_touch, (str(self.path),))


def _touch(path: str) -> None:
    Path(path).write_text("unpickled")


def test_object_array_refused_and_never_unpickled(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    payload = np.empty(2, dtype=object)
    payload[0], payload[1] = _Canary(canary), _Canary(canary)
    member = _npy(payload, allow_pickle=True)
    path = _zip(tmp_path / "d.npz", {"x.npy": member})
    with pytest.raises(InvalidData, match="object arrays are refused"):
        load_npz(path)
    assert not canary.exists()
    # Control: the payload is live, so the assertion above could have failed.
    np.load(io.BytesIO(member), allow_pickle=True)
    assert canary.exists()


@pytest.mark.parametrize(
    ("descr", "message"),
    [
        ("[('a', '<f4'), ('b', '|O')]", "object arrays are refused"),
        ("[('a', '<f4'), ('b', '<i4')]", "unsupported dtype"),
        ("'<M8[s]'", "unsupported dtype"),
        ("'|V8'", "unsupported dtype"),
    ],
)
def test_structured_and_odd_dtypes_refused(tmp_path: Path, descr: str, message: str) -> None:
    header = _header(f"{{'descr': {descr}, 'fortran_order': False, 'shape': (2,), }}")
    path = _zip(tmp_path / "d.npz", {"x.npy": header + b"\0" * 16})
    with pytest.raises(InvalidData, match=message):
        load_npz(path)


def test_huge_declared_shape_refused_before_allocation(tmp_path: Path) -> None:
    huge = _header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({10**12}, 16), }}")
    overflow = _header(f"{{'descr': '<f8', 'fortran_order': False, 'shape': ({2**62}, {2**62}), }}")
    tracemalloc.start()
    try:
        for index, header in enumerate((huge, overflow)):
            path = _zip(tmp_path / f"d{index}.npz", {"x.npy": header + b"\0" * 64})
            with pytest.raises(InvalidData, match="more than the limit"):
                load_npz(path)
        # Under the per-array limit but the member holds far fewer bytes than declared.
        liar = _header("{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 50000), }")
        path = _zip(tmp_path / "liar.npz", {"x.npy": liar + b"\0" * 64})
        with pytest.raises(InvalidData, match="header declares 200000000"):
            load_npz(path, DataLimits(max_array_bytes=10**9, max_total_bytes=10**9))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_negative_dimension_refused(tmp_path: Path) -> None:
    header = _header("{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 16), }")
    path = _zip(tmp_path / "d.npz", {"x.npy": header})
    with pytest.raises(InvalidData, match="negative"):
        load_npz(path)


_VALID = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"


@pytest.mark.parametrize(
    "member",
    [
        b"definitely not an npy file",
        b"\x93NUMPY\x01\x00",
        _header("[1, 2, 3]"),
        _header("{'descr': '<f4', 'shape': (2,)}"),
        _header("{'descr': '<zz9', 'fortran_order': False, 'shape': (2,), }"),
        _header("{'descr': '<f4', 'fortran_order': False, 'shape': (2.5,), }"),
        _header("{'descr': '<f4', 'fortran_order': 'yes', 'shape': (2,), }"),
        _header("{'descr': __import__('os').getcwd(), 'fortran_order': False, 'shape': (2,), }"),
        _header("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "(" * 300 + ")" * 300 + "), }"),
        _header(_VALID, version=(3, 0)),
        _header(_VALID, version=(9, 9)),
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b"{'descr': '<f4'",
        b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{",
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 16) + bytes(range(240, 256)),
    ],
)
def test_malformed_header_is_invalid_data(tmp_path: Path, member: bytes) -> None:
    path = _zip(tmp_path / "d.npz", {"x.npy": member + b"\0" * 8})
    with pytest.raises(InvalidData) as caught:
        load_npz(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300
    assert str(tmp_path) not in message


@pytest.mark.parametrize("data_bytes", [4, 12])
def test_truncated_or_padded_data_refused(tmp_path: Path, data_bytes: int) -> None:
    path = _zip(tmp_path / "d.npz", {"x.npy": _header(_VALID) + b"\0" * data_bytes})
    with pytest.raises(InvalidData, match=f"holds {data_bytes} data bytes but its header declares 8"):
        load_npz(path)


def test_version_2_header_reads(tmp_path: Path) -> None:
    header = _header("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", version=(2, 0))
    path = _zip(tmp_path / "d.npz", {"x.npy": header + np.arange(3, dtype="<i8").tobytes()})
    np.testing.assert_array_equal(load_npz(path).inputs["x"], [0, 1, 2])


def test_corrupted_member_bytes_refused(tmp_path: Path) -> None:
    x = np.arange(64, dtype=np.float32).reshape(4, 16)
    raw = bytearray(_savez(tmp_path / "d.npz", x=x).read_bytes())
    at = raw.find(x.tobytes())
    raw[at + 10] ^= 0xFF
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidData, match="CRC"):
        load_npz(path)


def test_not_a_zip_missing_file_and_directory(tmp_path: Path) -> None:
    text = tmp_path / "d.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(InvalidData, match="zip"):
        load_npz(text)
    for path in (tmp_path / "missing.npz", tmp_path):
        with pytest.raises(InvalidData) as caught:
            load_npz(path)
        assert str(tmp_path) not in str(caught.value)


def test_only_stored_or_deflated_members(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.npz", {"x.npy": _npy(_x(4))}, compression=zipfile.ZIP_BZIP2)
    with pytest.raises(InvalidData, match="compression method"):
        load_npz(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dir/x.npy", "invalid array name"),
        ("../x.npy", "invalid array name"),
        ("x.txt", "not an .npy array"),
        ("x/", "not an .npy array"),
    ],
)
def test_member_names_checked(tmp_path: Path, name: str, message: str) -> None:
    path = _zip(tmp_path / "d.npz", {name: _npy(_x(4))})
    with pytest.raises(InvalidData, match=message):
        load_npz(path)


def test_duplicate_member_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", _npy(_x(4)))
        archive.writestr("x.npy", _npy(_x(4, seed=1)))
    with pytest.raises(InvalidData, match="twice"):
        load_npz(path)


def test_limits(tmp_path: Path) -> None:
    path = _savez(tmp_path / "d.npz", x=_x(10), y=_x(10), labels=np.zeros(10, np.int64))
    assert len(load_npz(path)) == 10
    cases = [
        (DataLimits(max_arrays=2), "3 arrays, more than the limit of 2"),
        (DataLimits(max_samples=9), "10 samples, more than the limit of 9"),
        (DataLimits(max_array_bytes=639), "declares 640 bytes, more than the limit of 639"),
        (DataLimits(max_total_bytes=1000), "declares 1360 bytes, more than the limit of 1000"),
        (DataLimits(max_file_bytes=100), "more than the limit of 100"),
    ]
    for limits, message in cases:
        with pytest.raises(InvalidData, match=message):
            load_npz(path, limits)


def test_mismatched_lengths_name_both(tmp_path: Path) -> None:
    path = _savez(tmp_path / "d.npz", x=_x(10), labels=np.zeros(8, np.int64))
    with pytest.raises(InvalidData, match="labels has 8 samples but input 'x' has 10"):
        load_npz(path)


def test_scalar_empty_and_no_arrays_refused(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, np.ndarray], str]] = [
        ({"x": np.array(1.0, np.float32)}, "0-d"),
        ({"x": np.zeros((0, 16), np.float32)}, "input 'x' has no samples"),
        ({"x": np.zeros((5, 0), np.float32)}, "empty"),
    ]
    for arrays, message in cases:
        with pytest.raises(InvalidData, match=message):
            load_npz(_savez(tmp_path / "d.npz", **arrays))
    with pytest.raises(InvalidData, match="no arrays"):
        load_npz(_zip(tmp_path / "empty.npz", {}))


# ---------------------------------------------------------------- validate


def test_validate_accepts_matching_data(mlp: ModelArtifact) -> None:
    data = SampleData({"x": _x(8)}, np.arange(8, dtype=np.int32) % 4)
    checked = validate(data, mlp)
    assert checked.inputs["x"].dtype == np.float32
    assert checked.labels is not None and checked.labels.dtype == np.int64


def test_validate_missing_and_extra_inputs(mlp: ModelArtifact) -> None:
    with pytest.raises(InvalidData) as caught:
        validate(SampleData({"y": _x(4)}), mlp)
    assert str(caught.value) == "sample data lacks input 'x' (expected float32[N,16])"
    with pytest.raises(InvalidData, match="does not take: 'extra', 'z'"):
        validate(SampleData({"x": _x(4), "z": _x(4), "extra": _x(4)}), mlp)


def test_validate_dtype_mismatch_and_same_kind_cast(mlp: ModelArtifact, tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="input 'x' has dtype int64, expected float32"):
        validate(SampleData({"x": np.ones((4, 16), np.int64)}), mlp)
    wide = _x(4).astype(np.float64) / 3
    cast = validate(SampleData({"x": wide}), mlp).inputs["x"]
    assert cast.dtype == np.float32
    np.testing.assert_allclose(cast, wide, rtol=1e-6)
    swapped = validate(SampleData({"x": _x(4).astype(">f4")}), mlp).inputs["x"]
    assert swapped.dtype == np.float32 and swapped.dtype.isnative

    int64_model = _identity_model(tmp_path / "i64.onnx", TensorProto.INT64, ["batch", 4])
    ids = validate(SampleData({"x": np.ones((3, 4), np.int32)}), int64_model).inputs["x"]
    assert ids.dtype == np.int64
    with pytest.raises(InvalidData, match="dtype float32, expected int64"):
        validate(SampleData({"x": np.ones((3, 4), np.float32)}), int64_model)
    int32_model = _identity_model(tmp_path / "i32.onnx", TensorProto.INT32, ["batch", 4])
    with pytest.raises(InvalidData, match="outside the range of int32"):
        validate(SampleData({"x": np.full((3, 4), 2**40, np.int64)}), int32_model)


def test_validate_rank_and_dims(mlp: ModelArtifact, tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match=r"shape \(4, 4, 4\), expected float32\[N,16\] \(rank 2\)"):
        validate(SampleData({"x": np.ones((4, 4, 4), np.float32)}), mlp)
    with pytest.raises(InvalidData, match="axis 1 must be 16"):
        validate(SampleData({"x": np.ones((4, 8), np.float32)}), mlp)
    fixed = _identity_model(tmp_path / "fixed.onnx", TensorProto.FLOAT, [2, 16])
    assert len(validate(SampleData({"x": _x(10)}), fixed)) == 10
    dynamic = _identity_model(tmp_path / "dyn.onnx", TensorProto.FLOAT, ["batch", "seq"])
    assert validate(SampleData({"x": np.ones((3, 7), np.float32)}), dynamic).inputs["x"].shape == (3, 7)
    with pytest.raises(InvalidData, match="axis 1 is empty"):
        validate(SampleData({"x": np.ones((3, 0), np.float32)}), dynamic)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_refuses_non_finite(mlp: ModelArtifact, bad: float) -> None:
    x = _x(6)
    x[4, 3] = bad
    with pytest.raises(InvalidData, match="input 'x' contains NaN or infinite values"):
        validate(SampleData({"x": x}), mlp)


def test_validate_refuses_float64_overflowing_float32(mlp: ModelArtifact) -> None:
    x = _x(4).astype(np.float64)
    x[0, 0] = 1e39
    with pytest.raises(InvalidData, match="beyond the range of float32"):
        validate(SampleData({"x": x}), mlp)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, -1, 2]), ">= 0"),
        (np.zeros((4, 2), np.int64), "must be 1-D"),
        (np.array([0.5, np.nan, 1.0, 2.0]), "NaN or infinite"),
        (np.zeros((4, 2, 2), np.float32), "1-D or 2-D"),
        (np.array([True, False, True, True]), "integers .classes. or floats"),
        (np.zeros(3, np.int64), "labels has 3 samples but input 'x' has 4"),
    ],
)
def test_validate_labels(mlp: ModelArtifact, labels: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidData, match=message):
        validate(SampleData({"x": _x(4)}, labels), mlp)


def test_validate_regression_labels_and_uint_classes(mlp: ModelArtifact) -> None:
    targets = np.random.default_rng(0).normal(size=(4, 3))
    checked = validate(SampleData({"x": _x(4)}, targets), mlp)
    assert checked.labels is not None and checked.labels.shape == (4, 3)
    classes = validate(SampleData({"x": _x(4)}, np.array([0, 3, 1, 2], np.uint8)), mlp).labels
    assert classes is not None and classes.dtype == np.int64


def test_validate_model_input_called_labels(tmp_path: Path) -> None:
    model = _identity_model(tmp_path / "m.onnx", TensorProto.INT64, ["batch"], name=LABELS_KEY)
    loaded = load_npz(_savez(tmp_path / "d.npz", labels=np.arange(5)))
    checked = validate(loaded, model)
    assert list(checked.inputs) == [LABELS_KEY] and checked.labels is None
    np.testing.assert_array_equal(checked.inputs[LABELS_KEY], np.arange(5))


def test_validate_bfloat16_input_refuses_float_data(tmp_path: Path) -> None:
    model = _identity_model(tmp_path / "bf16.onnx", TensorProto.BFLOAT16, ["batch", 4])
    with pytest.raises(InvalidData, match=r"input 'x' has dtype float32, expected bfloat16"):
        validate(SampleData({"x": np.ones((2, 4), np.float32)}), model)


def test_load_then_validate_real_file(mlp: ModelArtifact, mlp_samples: Path) -> None:
    checked = validate(load_npz(mlp_samples), mlp)
    assert len(checked) == 64 and checked.labels is not None


# ---------------------------------------------------------------- deduplicate


def test_deduplicate_keeps_first_occurrence_order_and_labels() -> None:
    rows = _x(3)
    x = rows[[0, 1, 0, 2, 1, 1]]
    labels = np.array([10, 11, 12, 13, 14, 15])
    unique, dropped = deduplicate(SampleData({"x": x}, labels))
    assert dropped == 3
    np.testing.assert_array_equal(unique.inputs["x"], rows)
    assert unique.labels is not None
    np.testing.assert_array_equal(unique.labels, [10, 11, 13])


def test_deduplicate_compares_all_inputs_by_bytes() -> None:
    a = np.zeros((4, 2), np.float32)
    b = np.array([[1], [2], [1], [1]], np.int64)
    unique, dropped = deduplicate(SampleData({"a": a, "b": b}))
    assert dropped == 2
    np.testing.assert_array_equal(unique.inputs["b"], [[1], [2]])
    assert deduplicate(SampleData({"x": np.zeros((0, 3), np.float32)}))[1] == 0
    signed = np.array([[0.0], [-0.0], [0.0]], np.float32)  # equal values, different bytes
    assert deduplicate(SampleData({"x": signed}))[1] == 1


def test_deduplicate_matches_reference_on_many_samples() -> None:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 3, size=(2000, 3, 2)).astype(np.uint8)  # few values: many duplicates
    unique, dropped = deduplicate(SampleData({"x": base}))
    seen: dict[bytes, int] = {}
    for index, row in enumerate(base):
        seen.setdefault(row.tobytes(), index)
    expected = sorted(seen.values())
    assert dropped == len(base) - len(expected) > 0
    np.testing.assert_array_equal(unique.inputs["x"], base[expected])


# ---------------------------------------------------------------- split


def _indexed(samples: int, labels: np.ndarray | None = None) -> SampleData:
    """Data whose single input is the sample's own index, to identify samples after a split."""
    return SampleData({"x": np.arange(samples, dtype=np.float32).reshape(-1, 1)}, labels)


def _ids(data: SampleData) -> set[int]:
    return {int(v) for v in data.inputs["x"][:, 0]}


def test_split_is_deterministic_disjoint_and_sized() -> None:
    data = _indexed(100)
    first, again, other = split(data, seed=3), split(data, seed=3), split(data, seed=4)
    assert _ids(first.calibration) == _ids(again.calibration)
    assert _ids(first.calibration) != _ids(other.calibration)
    assert len(first.calibration) == 30 and len(first.validation) == 70
    assert not _ids(first.calibration) & _ids(first.validation)
    assert first.disjoint and first.total_samples == 100 and first.seed == 3


def test_split_caps() -> None:
    result = split(_indexed(100), max_calibration=10, max_validation=20)
    assert (len(result.calibration), len(result.validation)) == (10, 20)
    assert not _ids(result.calibration) & _ids(result.validation)


@pytest.mark.parametrize("seed", range(5))
def test_split_is_stratified(seed: int) -> None:
    labels = np.array([0] * 80 + [1] * 20)
    result = split(_indexed(100, labels), seed=seed)
    assert result.calibration.labels is not None and result.validation.labels is not None
    assert np.bincount(result.calibration.labels).tolist() == [24, 6]
    assert np.bincount(result.validation.labels).tolist() == [56, 14]
    assert not _ids(result.calibration) & _ids(result.validation)


def test_split_small_classes_and_regression_fall_back_to_plain() -> None:
    singleton = np.array([0] * 9 + [1])
    result = split(_indexed(10, singleton))
    assert (len(result.calibration), len(result.validation)) == (3, 7)
    targets = np.linspace(0, 1, 10)
    result = split(_indexed(10, targets))
    assert not _ids(result.calibration) & _ids(result.validation)


def test_split_tiny_sets() -> None:
    tiny = split(_indexed(3))
    assert _ids(tiny.calibration) == _ids(tiny.validation) == {0, 1, 2}
    assert not tiny.disjoint
    four = split(_indexed(4, np.array([0, 0, 1, 1])))
    assert four.disjoint and len(four.calibration) + len(four.validation) == 4
    assert not _ids(four.calibration) & _ids(four.validation)


def test_split_arguments_checked() -> None:
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(InvalidConfig):
            split(_indexed(10), calibration_fraction=fraction)
    with pytest.raises(InvalidData, match="no samples"):
        split(SampleData({"x": np.zeros((0, 1), np.float32)}))


# ---------------------------------------------------------------- prepare and its cache


def _with_duplicates(path: Path) -> Path:
    x = _x(60)
    x = np.concatenate([x, x[:10]])
    labels = np.concatenate([np.arange(60) % 4, np.arange(10) % 4])
    return _savez(path, x=x, labels=labels)


def test_prepare_end_to_end(mlp: ModelArtifact, tmp_path: Path) -> None:
    result = prepare(_with_duplicates(tmp_path / "d.npz"), mlp, seed=1)
    assert result.total_samples == 70 and result.duplicates_dropped == 10
    assert (len(result.calibration), len(result.validation)) == (18, 42)
    cal = {row.tobytes() for row in result.calibration.inputs["x"]}
    val = {row.tobytes() for row in result.validation.inputs["x"]}
    assert not cal & val and len(cal | val) == 60
    assert result.calibration.inputs["x"].dtype == np.float32


def test_prepare_cache_hit_skips_dedupe_and_split(
    mlp: ModelArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, cache = _with_duplicates(tmp_path / "d.npz"), tmp_path / "cache"
    first = prepare(path, mlp, seed=2, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1

    def fault(*args: object) -> None:
        raise AssertionError("recomputed despite a cache entry")

    monkeypatch.setattr(data_module, "_first_occurrences", fault)
    monkeypatch.setattr(data_module, "_split_indices", fault)
    second = prepare(path, mlp, seed=2, cache_dir=cache)
    np.testing.assert_array_equal(second.calibration.inputs["x"], first.calibration.inputs["x"])
    np.testing.assert_array_equal(second.validation.inputs["x"], first.validation.inputs["x"])
    assert second.validation.labels is not None and first.validation.labels is not None
    np.testing.assert_array_equal(second.validation.labels, first.validation.labels)
    assert second.duplicates_dropped == 10
    with pytest.raises(AssertionError, match="recomputed"):
        prepare(path, mlp, seed=3, cache_dir=cache)  # another seed is another key


@pytest.mark.parametrize("corrupt", ["garbage", "out_of_range"])
def test_prepare_corrupt_cache_is_ignored_and_rewritten(mlp: ModelArtifact, tmp_path: Path, corrupt: str) -> None:
    path, cache = _with_duplicates(tmp_path / "d.npz"), tmp_path / "cache"
    first = prepare(path, mlp, cache_dir=cache)
    (entry,) = cache.iterdir()
    if corrupt == "garbage":
        entry.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        np.savez(entry, calibration=np.array([0, 999]), validation=np.array([1]), meta=np.array([10, 70]))
    again = prepare(path, mlp, cache_dir=cache)
    np.testing.assert_array_equal(again.calibration.inputs["x"], first.calibration.inputs["x"])
    with np.load(entry, allow_pickle=False) as stored:
        assert stored["meta"].tolist() == [10, 70]
        assert stored["calibration"].max() < 70
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temp file left


def test_prepare_refuses_bad_data_without_caching(mlp: ModelArtifact, tmp_path: Path) -> None:
    path = _savez(tmp_path / "d.npz", x=np.ones((4, 8), np.float32))
    with pytest.raises(InvalidData, match="axis 1 must be 16"):
        prepare(path, mlp, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_builders_data_prepares(mlp: ModelArtifact, tmp_path: Path) -> None:
    path = builders.mlp_data(tmp_path / "s.npz", samples=12)
    result = prepare(path, mlp)
    assert len(result.calibration) + len(result.validation) == 12
