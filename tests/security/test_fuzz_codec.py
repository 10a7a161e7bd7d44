"""Property-based fuzzing of the KServe v2 codec (``service/protocol/codec.py``) with hypothesis.

The codec is driven in process (no server: fast, so the fuzzers go deep) with arbitrary bytes,
arbitrary JSON, arbitrary ``Inference-Header-Content-Length`` values, and structurally valid
requests whose fields are mutated (shapes, datatypes, data, binary sizes, names, parameters).
The property everywhere: ``decode_request`` either returns tensors whose name, datatype, shape,
dtype and size agree with what the request declared, or raises ``ProtocolError`` (the 400 of the
HTTP layer) with one short line; never another exception, never a large allocation. Valid
requests of every datatype, as JSON and as binary data, survive decode then encode unchanged.
One end-to-end test sends the same kind of inputs to a real ``slimserve serve``.

Every ``@settings`` here has ``derandomize=True``: CI runs the same examples on every run, so a
failure is reproducible from the log alone.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.errors import TooLarge
from service.protocol.codec import decode_request, encode_response, parse_header_length
from service.protocol.types import DATATYPES, CodecLimits, InferResponse, ProtocolError, datatype_to_numpy
from tests.builders import mlp_data, mlp_onnx
from tests.e2e.conftest import assert_error, job_config, serving, upload
from tests.serverproc import Proc, wait_for, wait_job

LIMITS = CodecLimits()
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # reproducible in CI: the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
#: Dimensions a client can send: small, zero, negative, past int32/int64/uint64, and not integers at all.
WEIRD_DIMS = [-1, -(2**63), 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]
JUNK: list[Any] = [None, True, False, -1, 0, 1.5, 2**64, "", "1", "x" * 300, [], [1], {}, {"a": 1}]


# --------------------------------------------------------------------------- the property


def assert_one_line(message: str) -> None:
    """A client-facing error: one non-empty, bounded line with no traceback."""
    assert isinstance(message, str) and message.strip(), message
    assert "\n" not in message and "\r" not in message, message
    assert "Traceback" not in message, message
    assert len(message) < 1200, message


def check(body: bytes, header_length: int | None, limits: CodecLimits = LIMITS) -> bool:
    """Decode ``body``: True when it decoded (and agrees with its declarations), False for a clean ProtocolError.

    Any other exception escapes and fails the test.
    """
    try:
        request = decode_request(body, header_length=header_length, limits=limits)
    except ProtocolError as exc:
        assert_one_line(exc.message)
        return False
    except TooLarge:
        assert len(body) > limits.max_body_bytes
        return False
    end = len(body) if header_length is None else header_length
    doc = json.loads(body[:end])
    declared = doc["inputs"]
    assert len(request.inputs) == len(declared) <= limits.max_inputs
    for tensor, raw in zip(request.inputs, declared, strict=True):
        shape = tuple(raw["shape"])
        assert tensor.name == raw["name"]
        assert tensor.datatype == raw["datatype"]
        assert tensor.shape == shape
        assert tensor.data.shape == shape
        assert tensor.data.dtype == datatype_to_numpy(raw["datatype"])
        assert tensor.data.size == math.prod(shape) <= limits.max_elements
        if tensor.datatype == "BYTES":
            assert all(isinstance(item, bytes) for item in tensor.data.reshape(-1))
    return True


# --------------------------------------------------------------------------- strategies

#: BYTES elements sent as JSON are strings; lone surrogates are not UTF-8 (``elements`` sends those as a mutation).
utf8_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)


def mostly(valid: st.SearchStrategy[Any], mutated: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` five times in six, else ``mutated``: each field is wrong alone often enough to reach deep checks."""
    return st.sampled_from([False] * 5 + [True]).flatmap(lambda mutate: mutated if mutate else valid)


def one_in(draw: st.DrawFn, n: int) -> bool:
    """True about once in ``n`` draws (the rare choice last: hypothesis favours the first when it simplifies)."""
    return bool(draw(st.sampled_from([False] * (n - 1) + [True])))


dims = mostly(st.integers(0, 3), st.sampled_from(WEIRD_DIMS) | st.sampled_from([1.0, 2.5, "2", None, True, [1]]))
shapes = mostly(
    st.lists(dims, max_size=3), st.sampled_from([None, "1,2", 3, {}, [[1, 2]], [1] * 17, [0, 2**63], [0, 2**62, 8]])
)
datatypes = mostly(
    st.sampled_from(list(DATATYPES)), st.sampled_from(["FP128", "fp32", "BF16", "", "STRING"]) | json_scalars
)
names = mostly(st.sampled_from(["x", "y", "z"]), st.sampled_from([None, "", "a" * 300, 7, "../x", "n\x00ul", "é"]))
#: One data element of any JSON kind, including those JSON cannot carry (NaN and infinity come out as NaN / Infinity).
elements = (
    st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(width=64)
    | st.text(max_size=5)
    | st.none()
    | st.sampled_from([[], {}, "\ud800"])
)


def element_for(datatype: Any) -> st.SearchStrategy[Any]:
    """Elements that fit ``datatype`` (so many requests decode), or anything when it is not one."""
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if datatype == "BYTES":
        return utf8_text
    if dtype is None:
        return elements
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    return st.floats(-60000, 60000, allow_nan=False)


@st.composite
def tensor_data(draw: st.DrawFn, datatype: Any, shape: Any) -> Any:
    """A ``data`` value: right for the shape (flat or nested), or off by one, ragged, mixed or junk."""
    fits = isinstance(shape, list) and all(type(d) is int and 0 <= d <= 4 for d in shape)
    if not fits or one_in(draw, 10):
        return draw(st.lists(elements, max_size=6) | st.sampled_from(JUNK))
    count = math.prod(shape)
    kind = elements if one_in(draw, 5) else element_for(datatype)
    flat = draw(st.lists(kind, min_size=count, max_size=count))
    move = draw(st.sampled_from(["flat", "nested", "nested", "short", "long", "ragged", "deeper"]))
    if move == "short" and flat:
        return flat[:-1]
    if move == "long":
        return [*flat, draw(kind)]
    if move == "deeper":
        return [flat]
    if move in ("nested", "ragged") and len(shape) > 1:
        cells = np.empty(count, dtype=object)
        cells[:] = flat
        nested: Any = cells.reshape(shape).tolist() if count else []
        if move == "ragged" and nested and isinstance(nested[0], list) and nested[0]:
            nested[0] = nested[0][:-1]
        return nested
    return flat


def blob_for(datatype: Any, shape: Any, data: list[Any]) -> bytes:
    """The binary form a correct client sends for ``data`` (ignoring what does not fit)."""
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    flat = [item for item in data if not isinstance(item, list)]
    if datatype == "BYTES":
        raw = [item.encode("utf-8", "replace") if isinstance(item, str) else b"?" for item in flat]
        return b"".join(struct.pack("<I", len(item)) + item for item in raw)
    if dtype is None:
        return bytes(len(flat))
    try:
        with np.errstate(all="ignore"):
            return np.array(flat, dtype=dtype).tobytes()
    except (ValueError, TypeError, OverflowError):
        return bytes(len(flat) * dtype.itemsize)


@st.composite
def fuzzed_input(draw: st.DrawFn, index: int) -> tuple[dict[str, Any], bytes | None]:
    """One input object (and its binary blob, when it claims one), fields drawn valid or mutated."""
    datatype = draw(datatypes)
    shape = draw(shapes)
    name = draw(mostly(st.just(f"in{index}"), names))  # names: junk, and duplicates across inputs
    item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    data = draw(tensor_data(datatype, shape))
    if one_in(draw, 3):  # binary data
        blob = blob_for(datatype, shape, data if isinstance(data, list) else [])
        if one_in(draw, 4):
            blob = draw(st.binary(max_size=40))
        size = draw(st.sampled_from([len(blob)] * 4 + [len(blob) + 1, max(len(blob) - 1, 0), -1, 2**40, "8", 1.0]))
        item["parameters"] = {"binary_data_size": size}
        if one_in(draw, 10):
            item["data"] = data
        return item, blob
    item["data"] = data
    if one_in(draw, 6):
        del item["data"]
    if one_in(draw, 6):
        item["parameters"] = draw(
            st.sampled_from(JUNK)
            | st.dictionaries(st.sampled_from(["binary_data_size", "shared_memory_region"]), json_scalars)
        )
    return item, None


@st.composite
def fuzzed_requests(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """A request body and header length: mostly well-formed JSON with mutated fields, blobs appended."""
    count = draw(mostly(st.integers(1, 3), st.just(0)))
    pairs = [draw(fuzzed_input(index)) for index in range(count)]
    doc: dict[str, Any] = {"inputs": [item for item, _ in pairs]}
    request_id = draw(mostly(st.none() | utf8_text, json_scalars))
    if request_id is not None:
        doc["id"] = request_id
    doc["parameters"] = draw(
        mostly(
            st.fixed_dictionaries({}, optional={"binary_data_output": st.booleans(), "timeout": st.integers(0, 10**6)}),
            st.sampled_from(JUNK)
            | st.dictionaries(st.sampled_from(["binary_data_output", "timeout", "classification"]), json_scalars),
        )
    )
    outputs = draw(
        mostly(
            st.none(),
            st.sampled_from(JUNK)
            | st.lists(
                st.fixed_dictionaries({"name": names}, optional={"parameters": st.sampled_from(JUNK) | st.just({})}),
                max_size=3,
            ),
        )
    )
    if outputs is not None:
        doc["outputs"] = outputs
    header = json.dumps(doc).encode()  # NaN / Infinity are written as such: not JSON, must be refused
    blobs = b"".join(blob for _, blob in pairs if blob is not None)
    if not blobs and draw(st.booleans()):
        return header, None
    body = header + blobs
    shift = draw(mostly(st.just(0), st.sampled_from([-1, 1, -len(header), len(body) - len(header) + 1])))
    return body, len(header) + shift


# --------------------------------------------------------------------------- in-process fuzzing


@FUZZ
@given(body=st.binary(max_size=200), header_length=st.none() | st.integers(-(2**64), 2**64) | st.integers(0, 220))
def test_arbitrary_bytes_are_refused_cleanly(body: bytes, header_length: int | None) -> None:
    """Any bytes, any header length (negative, huge, past the end): a clean ProtocolError or a valid decode."""
    check(body, header_length)


@FUZZ
@given(text=st.text(max_size=30) | st.from_regex(r"\s*-?[0-9]{0,25}\s*", fullmatch=True))
def test_header_length_header_parses_or_is_refused(text: str) -> None:
    """The ``Inference-Header-Content-Length`` value: a non-negative byte count, or a clean ProtocolError."""
    try:
        value = parse_header_length(text)
    except ProtocolError as exc:
        assert_one_line(exc.message)
        return
    assert value is not None and value == int(text.strip()) >= 0


@FUZZ
@given(doc=json_values, header=st.booleans())
def test_arbitrary_json_is_refused_cleanly(doc: Any, header: bool) -> None:
    """Any JSON value as the body (with or without the header-length header): a clean ProtocolError or a decode."""
    body = json.dumps(doc).encode()
    check(body, len(body) if header else None)


@FUZZ
@given(request=fuzzed_requests())
@example(request=(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[0,9223372036854775808],"data":[]}]}', None))
@example(request=(b'{"inputs":[{"name":"x","datatype":"INT8","shape":[0,4611686018427387904,8],"data":[]}]}', None))
@example(
    request=(
        b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[0,9223372036854775808],'
        b'"parameters":{"binary_data_size":0}}]}',
        90,
    )
)
@example(request=(b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', None))
@example(request=(b'{"inputs":[{"name":"x","datatype":"INT32","shape":[2],"data":[true,2]}]}', None))
def test_mutated_requests_decode_as_declared_or_are_refused(request: tuple[bytes, int | None]) -> None:
    """Structurally valid requests with mutated fields: negative, zero, huge and overflowing dims (a zero dim next
    to a dim past int64 is the case numpy itself cannot build), datatypes valid and invalid, data of the wrong
    length, ragged, too deep or of the wrong kinds (booleans, strings, None, NaN, Inf, big integers), BYTES,
    duplicate names, lying ``binary_data_size`` and header lengths, parameters of the wrong type.

    CVE-2026-24173 (Triton: an integer overflow in request processing lets a malformed request crash the server)
    and CVE-2025-23320 (Triton: an error message leaked internal state): every field either decodes to what it
    declares or is a one-line 400.
    """
    body, header_length = request
    check(body, header_length)


@pytest.mark.parametrize(
    ("datatype", "shape", "binary"),
    [
        ("FP32", [0, 2**63], False),
        ("INT8", [0, 2**62, 8], True),
        ("BYTES", [0, 2**63], True),
        ("BOOL", [3, 0, 2**30], False),
    ],
)
def test_an_empty_tensor_with_a_dim_past_the_limit_is_a_400(datatype: str, shape: list[int], binary: bool) -> None:
    """Found by the fuzzer: a zero dim next to a dim past int64 (or whose non-zero dims multiply past intp) has zero
    elements, so it passed the element limit, and numpy's ``np.empty`` / ``reshape`` then raised ValueError (a 500).
    Fixed in ``codec._input_header``: the product of the non-zero dims is bounded too."""
    item: dict[str, Any] = {"name": "x", "datatype": datatype, "shape": shape}
    if binary:
        item["parameters"] = {"binary_data_size": 0}
    else:
        item["data"] = []
    body = json.dumps({"inputs": [item]}).encode()
    with pytest.raises(ProtocolError, match="spans more than"):
        decode_request(body, header_length=len(body) if binary else None)


def test_the_fuzzers_reach_both_outcomes() -> None:
    """The mutated-request strategy is not vacuous: it yields requests that decode and requests that are refused."""
    outcomes: set[bool] = set()

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(request=fuzzed_requests())
    def run(request: tuple[bytes, int | None]) -> None:
        outcomes.add(check(*request))

    run()
    assert outcomes == {True, False}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    datatype=st.sampled_from(list(DATATYPES)),
    shape=st.lists(st.integers(1, 2**40), min_size=1, max_size=4).filter(lambda s: math.prod(s) >= 2**40)
    | st.sampled_from([[2**40], [2**20, 2**20], [2**62, 2**62, 2**62], [1, 2**64 - 1]]),
    binary=st.booleans(),
    claimed=st.sampled_from([0, 8, "product"]),
)
def test_a_huge_declared_shape_is_refused_before_allocating(
    datatype: str, shape: list[int], binary: bool, claimed: Any
) -> None:
    """A shape of 2**40 or more elements (up to products past 2**63) is refused, and nothing near its size is
    allocated on the way (tracemalloc sees numpy's buffers): the peak stays under 4 MiB whatever the body claims.

    CVE-2025-33201 (Triton: an unchecked, exceptionally large payload exhausts the server) and CVE-2026-24146
    (Triton: memory allocation of an excessive size from request fields): sizes come from the request, so they
    are checked with Python integers before numpy sees them.
    """
    item: dict[str, Any] = {"name": "x", "datatype": datatype, "shape": shape}
    blob = b""
    if binary:
        size = math.prod(shape) * 4 if claimed == "product" else claimed
        item["parameters"] = {"binary_data_size": size}
        blob = bytes(claimed) if isinstance(claimed, int) else b""
    else:
        item["data"] = [] if claimed == 0 else [1] * 8
    header = json.dumps({"inputs": [item]}).encode()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as caught:
            decode_request(header + blob, header_length=len(header) if binary else None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line(caught.value.message)
    assert peak < 4 << 20, f"{peak} bytes allocated while refusing shape {shape}"


# --------------------------------------------------------------------------- round trip


@st.composite
def valid_tensor(draw: st.DrawFn, name: str) -> tuple[np.ndarray, str, bool, bool]:
    """A valid tensor of any datatype: (array, datatype, sent as binary, JSON data nested)."""
    datatype = draw(st.sampled_from(list(DATATYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    count = math.prod(shape)
    binary = draw(st.booleans())
    dtype = DATATYPES[datatype]
    if dtype is None:
        items = draw(
            st.lists(st.binary(max_size=6) if binary else utf8_text.map(str.encode), min_size=count, max_size=count)
        )
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape), datatype, binary, draw(st.booleans())
    if binary and dtype.kind != "b":  # any bit pattern: NaN payloads, infinities, subnormals
        raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
        return np.frombuffer(raw, dtype=dtype).reshape(shape), datatype, binary, False
    from hypothesis.extra import numpy as npst

    values = npst.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    array = draw(npst.arrays(dtype, shape, elements=values))
    return array, datatype, binary, draw(st.booleans())


def flat_json(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [item.decode() for item in array.reshape(-1)]
    return list(array.reshape(-1).tolist())


def blob_of(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=st.lists(st.integers(0, 99), min_size=1, max_size=3, unique=True).flatmap(
        lambda ids: st.tuples(*[valid_tensor(f"t{i}") for i in ids]).map(
            lambda ts: list(zip([f"t{i}" for i in ids], ts, strict=True))
        )
    ),
    request_id=st.none() | st.text(max_size=8),
)
def test_valid_requests_round_trip(
    tensors: list[tuple[str, tuple[np.ndarray, str, bool, bool]]], request_id: str | None
) -> None:
    """encode(decode(x)) == x: valid requests of every datatype (JSON data flat or nested, or binary data of any
    bit pattern, NaN and infinity included) decode to exactly their arrays, and the encoder writes each back as
    the same tensor (name, datatype, shape, data or binary_data_size and the same bytes)."""
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    canonical: list[dict[str, Any]] = []
    binary_names: set[str] = set()
    for name, (array, datatype, binary, nested) in tensors:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = blob_of(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
            binary_names.add(name)
            canonical.append(entry)
            inputs.append(entry)
            continue
        flat = flat_json(array, datatype)
        canonical.append({**entry, "data": flat})
        sent = np.array(flat, dtype=object).reshape(array.shape).tolist() if nested and array.ndim > 1 else flat
        inputs.append({**entry, "data": sent})
    doc: dict[str, Any] = {"inputs": inputs}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc).encode()
    body = header + b"".join(blobs)
    decoded = decode_request(body, header_length=len(header) if blobs else None)

    for tensor, (_, (array, datatype, _, _)) in zip(decoded.inputs, tensors, strict=True):
        assert tensor.data.dtype == datatype_to_numpy(datatype)
        assert tensor.data.shape == array.shape
        if datatype == "BYTES":
            assert tensor.data.tolist() == array.tolist()
        else:
            assert tensor.data.tobytes() == np.ascontiguousarray(array).tobytes()  # bit-exact, NaN payloads too

    payload, headers = encode_response(
        InferResponse("m", "1", decoded.id, decoded.inputs), binary=lambda name: name in binary_names
    )
    length = int(headers.get("Inference-Header-Content-Length", len(payload)))
    answer = orjson.loads(payload[:length])
    assert answer.get("id") == request_id
    assert payload[length:] == b"".join(blobs)
    assert len(answer["outputs"]) == len(canonical)
    for out, want in zip(answer["outputs"], canonical, strict=True):
        assert {k: v for k, v in out.items() if k != "data"} == {k: v for k, v in want.items() if k != "data"}
        if "data" in want:
            if want["datatype"] == "BYTES":
                assert out["data"] == want["data"]
            else:
                dtype = datatype_to_numpy(want["datatype"])
                assert np.array(out["data"], dtype=dtype).tobytes() == np.array(want["data"], dtype=dtype).tobytes()


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def served_mlp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    """A real server whose model ``m`` (the tiny MLP, input ``x[batch, 16]``) is ready to infer."""
    folder = tmp_path_factory.mktemp("fuzz-codec")
    model, data = mlp_onnx(folder / "mlp.onnx"), mlp_data(folder / "mlp.npz")
    home = folder / "home"
    with serving(home, registry_poll_seconds="0.2", max_queue_delay_microseconds="0", drain_seconds="0") as proc:
        response = upload(proc.url, model, data, job_config("m"))
        assert response.status_code == 202, response.text
        assert wait_job(proc.url, response.json()["job"]["id"])["status"] == "succeeded"
        wait_for(lambda: httpx.get(f"{proc.url}/v2/models/m/ready", timeout=10).status_code == 200, timeout=60)
        yield proc, home


def good_request_works(url: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16], "data": [0.25] * 32}]}
    response = httpx.post(f"{url}/v2/models/m/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [2, 4]


@pytest.mark.slow
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=fuzzed_requests() | st.tuples(st.binary(max_size=80), st.none() | st.integers(-5, 100)))
@example(request=(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[0,9223372036854775808],"data":[]}]}', None))
@example(request=(b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', None))
def test_http_turns_fuzzed_requests_into_400(served_mlp: tuple[Proc, Path], request: tuple[bytes, int | None]) -> None:
    """Over real HTTP (the ASGI fast path): each fuzzed body gets 200 or a 400 with a one-line ``{"error": ...}``
    that leaks no path, never a 500 or a hang (explicit timeouts); a valid request right after succeeds."""
    proc, home = served_mlp
    body, header_length = request
    headers = {"Content-Type": "application/octet-stream" if header_length is not None else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    response = httpx.post(f"{proc.url}/v2/models/m/infer", content=body, headers=headers, timeout=30)
    if response.status_code != 200:
        assert_error(response, 400, home)
    good_request_works(proc.url)
