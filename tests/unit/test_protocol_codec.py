"""service.protocol: KServe v2 bodies built by hand the way ``tritonclient.http`` builds them, decoded and answered.

The client side here (``client_request``, ``client_result``) follows tritonclient's
``_get_inference_request``, ``InferInput.set_data_from_numpy`` and ``InferResult`` line by line,
without the codec, so a round trip checks the codec against the protocol rather than against
itself. Every malformed body must raise ProtocolError (a 400), never anything else.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from service.errors import BadRequest, TooLarge
from service.protocol.codec import decode_request, encode_json, encode_response, parse_header_length
from service.protocol.types import (
    DATATYPES,
    CodecLimits,
    InferRequest,
    InferResponse,
    ProtocolError,
    Tensor,
    datatype_to_numpy,
    numpy_to_datatype,
)

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    **{
        name: np.array([[np.iinfo(dtype).min, 0, 1], [2, 100, np.iinfo(dtype).max]], dtype=dtype)
        for name, dtype in DATATYPES.items()
        if dtype is not None and dtype.kind in "iu"
    },
    "FP16": np.array([[-1.5, 0.0, 65504.0], [6.1e-5, 0.333, -2.0]], dtype=np.float16),
    "FP32": np.array([[-1.5, 0.1, 3.4e38], [1e-38, 0.333, -2.0]], dtype=np.float32),
    "FP64": np.array([[-1.5, 0.1, 1e308], [5e-324, 1 / 3, -2.0]], dtype=np.float64),
    "BYTES": np.array([[b"a", b"", "é".encode()], [b"xyz" * 10, b"tab\t", b"\x00zero"]], dtype=object),
}


def blob(array: np.ndarray, datatype: str) -> bytes:
    """tritonclient's binary form of a tensor (``serialize_byte_tensor`` for BYTES)."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return array.tobytes()


def client_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """``InferInput(name, shape, datatype).set_data_from_numpy(array, binary_data=binary)._get_tensor()``."""
    tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
    if binary:
        raw = blob(array, datatype)
        tensor["parameters"] = {"binary_data_size": len(raw)}
        return tensor, raw
    if datatype == "BYTES":
        tensor["data"] = [item.decode("utf-8") for item in array.reshape(-1)]
    else:
        tensor["data"] = [value.item() for value in array.flatten()]
    return tensor, None


def client_request(
    inputs: list[tuple[str, np.ndarray, str]],
    *,
    binary: bool = True,
    outputs: list[dict[str, Any]] | None = None,
    request_id: str = "",
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The body and Inference-Header-Content-Length of ``InferenceServerClient.infer`` (defaults: binary)."""
    request: dict[str, Any] = {}
    params = dict(parameters or {})
    if request_id:
        request["id"] = request_id
    pairs = [client_input(name, array, datatype, binary) for name, array, datatype in inputs]
    request["inputs"] = [tensor for tensor, _ in pairs]
    if outputs:
        request["outputs"] = outputs
    else:
        params["binary_data_output"] = True
    if params:
        request["parameters"] = params
    header = json.dumps(request).encode()
    raws = [raw for _, raw in pairs if raw is not None]
    if not raws:
        return header, None
    return b"".join([header, *raws]), len(header)


def client_result(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``InferResult``: the response JSON and every output as numpy (BYTES as an object array of bytes)."""
    length = headers.get("Inference-Header-Content-Length")
    if length is None:
        assert headers["content-type"] == "application/json"
        result, buffer = json.loads(body), b""
    else:
        assert headers["content-type"] == "application/octet-stream"
        result, buffer = json.loads(body[: int(length)]), body[int(length) :]
    arrays: dict[str, np.ndarray] = {}
    position = 0
    for output in result["outputs"]:
        datatype = output["datatype"]
        dtype = datatype_to_numpy(datatype)
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            data = output["data"]
            array = (
                np.array([item.encode() for item in data] or [], dtype=object)
                if datatype == "BYTES"
                else np.array(data, dtype=dtype)
            )
        else:
            chunk = buffer[position : position + size]
            position += size
            if datatype == "BYTES":
                items, at = [], 0
                while at < len(chunk):
                    (n,) = struct.unpack_from("<I", chunk, at)
                    items.append(chunk[at + 4 : at + 4 + n])
                    at += 4 + n
                array = np.empty(len(items), dtype=object)
                array[:] = items
            else:
                array = np.frombuffer(chunk, dtype=dtype)
        arrays[output["name"]] = array.reshape(output["shape"])
    assert position == len(buffer)
    return result, arrays


def assert_same(got: np.ndarray, want: np.ndarray, datatype: str) -> None:
    assert got.shape == want.shape
    if datatype == "BYTES":
        assert got.dtype == object
        assert [bytes(x) for x in got.reshape(-1)] == [bytes(x) for x in want.reshape(-1)]
    else:
        assert got.dtype == DATATYPES[datatype]
        np.testing.assert_array_equal(got, want)


def rejects(body: bytes, header_length: int | None = None, limits: CodecLimits | None = None) -> str:
    """Decode a malformed body; return the ProtocolError's message after checking it is one 400 line."""
    with pytest.raises(ProtocolError) as caught:
        decode_request(body, header_length=header_length, limits=limits or CodecLimits())
    assert isinstance(caught.value, BadRequest) and caught.value.status == 400
    assert "\n" not in caught.value.message and len(caught.value.message) < 300
    return caught.value.message


def one_input(**fields: Any) -> bytes:
    """A JSON request with one input ``x`` (FP32 [2] by default), fields overridden (None: removed)."""
    tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    tensor.update(fields)
    return orjson.dumps({"inputs": [{k: v for k, v in tensor.items() if v is not None}]})


# -- datatypes --------------------------------------------------------------------------------


def test_datatype_table_round_trips() -> None:
    for name, dtype in DATATYPES.items():
        assert numpy_to_datatype(datatype_to_numpy(name)) == name
        if dtype is not None:
            assert numpy_to_datatype(dtype.newbyteorder(">")) == name  # byte order is the codec's business
    assert numpy_to_datatype(np.dtype("<U3")) == numpy_to_datatype(np.bytes_) == "BYTES"
    assert numpy_to_datatype(np.float32) == "FP32"
    with pytest.raises(ValueError, match="complex"):
        numpy_to_datatype(np.complex64)
    with pytest.raises(ProtocolError, match="unknown datatype 'BF16'"):
        datatype_to_numpy("BF16")


def test_parse_header_length() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length("123") == 123
    for bad in ("", "-1", "1.5", "0x10", "١٢", "9" * 40):
        with pytest.raises(ProtocolError):
            parse_header_length(bad)


# -- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_datatype_decodes(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    body, header_length = client_request([("x", array, datatype)], binary=binary, request_id="r-1")
    request = decode_request(body, header_length=header_length)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape, request.id) == ("x", datatype, (2, 3), "r-1")
    assert_same(tensor.data, array, datatype)


def test_the_specs_binary_example() -> None:
    """The two-input request of Triton's binary tensor data extension document, byte for byte."""
    header = orjson.dumps(
        {
            "model_name": "mymodel",
            "inputs": [
                {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "parameters": {"binary_data_size": 16}},
                {"name": "input1", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}},
            ],
            "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
        }
    )
    body = header + struct.pack("<4I", 1, 2, 3, 4) + b"\x01\x00\x01"
    request = decode_request(body, header_length=len(header))
    np.testing.assert_array_equal(request.inputs[0].data, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(request.inputs[1].data, [True, False, True])
    assert request.outputs is not None and [(o.name, o.binary) for o in request.outputs] == [("output0", True)]
    assert request.binary_default is False and request.wants_binary("output0") and not request.wants_binary("other")


def test_tritonclient_defaults_ask_for_binary_outputs_and_selection_overrides() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, length = client_request([("x", x, "FP32")])
    request = decode_request(body, header_length=length)
    assert request.outputs is None and request.binary_default and request.wants_binary("y")
    body, length = client_request(
        [("x", x, "FP32")],
        outputs=[{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        parameters={"timeout": 5000, "priority": 1},
    )
    request = decode_request(body, header_length=length)
    assert not request.wants_binary("y") and not request.wants_binary("z")
    assert request.parameters["timeout"] == 5000


def test_mixed_json_and_binary_inputs_and_nested_json() -> None:
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.array([[0.5, 1.5]], dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "INT64", "shape": [2, 3], "data": [[0, 1, 2], [3, 4, 5]]},
                {"name": "b", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
                {"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["hi"], ["ü"]]},
            ]
        }
    )
    # an odd-length header puts b's floats at an unaligned offset: the codec copies them
    header += b" " * (1 - len(header) % 2)
    request = decode_request(header + b.tobytes(), header_length=len(header))
    np.testing.assert_array_equal(request.inputs[0].data, a)
    np.testing.assert_array_equal(request.inputs[1].data, b)
    assert request.inputs[1].data.flags.aligned
    assert request.inputs[2].data.tolist() == [[b"hi"], ["ü".encode()]]


def test_empty_and_scalar_tensors() -> None:
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "e", "datatype": "FP32", "shape": [0, 3], "data": []},
                {"name": "s", "datatype": "INT32", "shape": [], "data": [7]},
                {"name": "b", "datatype": "BYTES", "shape": [0], "parameters": {"binary_data_size": 0}},
            ]
        }
    )
    request = decode_request(body, header_length=len(body))
    assert request.inputs[0].data.shape == (0, 3) and request.inputs[0].data.dtype == np.float32
    assert request.inputs[1].data.shape == () and int(request.inputs[1].data) == 7
    assert request.inputs[2].data.shape == (0,)


def test_limits_bound_the_request() -> None:
    limits = CodecLimits(max_elements=6, max_inputs=2, max_outputs=1, max_rank=2, max_id_length=4, max_body_bytes=400)
    assert decode_request(one_input(shape=[2, 3], data=[0.0] * 6), header_length=None, limits=limits)
    assert "more than 6 elements" in rejects(one_input(shape=[7], data=[0.0] * 7), limits=limits)
    assert "3 dimensions" in rejects(one_input(shape=[1, 1, 2]), limits=limits)
    many = orjson.dumps({"inputs": [{"name": f"i{n}", "datatype": "FP32", "shape": [0], "data": []} for n in range(3)]})
    assert "3 inputs" in rejects(many, limits=limits)
    outputs = orjson.dumps({"inputs": orjson.loads(one_input())["inputs"], "outputs": [{"name": "a"}, {"name": "b"}]})
    assert "2 outputs" in rejects(outputs, limits=limits)
    assert "request id" in rejects(orjson.dumps({"id": "12345", "inputs": []}), limits=limits)
    with pytest.raises(TooLarge):
        decode_request(b" " * 401, header_length=None, limits=limits)


def test_float_range_edges() -> None:
    """A JSON number that rounds to the largest finite value is kept; one that rounds to infinity is refused."""
    request = decode_request(one_input(datatype="FP16", data=[65519.0, -65519.0]), header_length=None)
    assert request.inputs[0].data.tolist() == [65504.0, -65504.0]
    assert "range of FP16" in rejects(one_input(datatype="FP16", data=[0.0, -65520.0]))
    assert np.isfinite(decode_request(one_input(data=[3.4028235e38, 0.0]), header_length=None).inputs[0].data).all()
    assert "range of FP32" in rejects(one_input(data=[3.40282357e38, 0.0]))


def test_a_huge_declared_shape_is_refused_before_allocating() -> None:
    header = one_input(shape=[1 << 40, 1 << 40], data=None, parameters={"binary_data_size": 8})
    assert "more than" in rejects(header + b"\0" * 8, header_length=len(header))


U8 = {"name": "x", "datatype": "UINT8", "shape": [2], "data": [1, 2]}
BIN = {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}

MALFORMED_JSON: list[tuple[str, Any, str]] = [
    ("top-level array", [U8], "JSON object"),
    ("no inputs", {}, "'inputs'"),
    ("empty inputs", {"inputs": []}, "'inputs'"),
    ("inputs not a list", {"inputs": {"x": 1}}, "'inputs'"),
    ("input not an object", {"inputs": [3]}, "inputs[0]"),
    ("no name", {"inputs": [{**U8, "name": None}]}, "inputs[0] needs a name"),
    ("empty name", {"inputs": [{**U8, "name": ""}]}, "inputs[0] needs a name"),
    ("long name", {"inputs": [{**U8, "name": "n" * 300}]}, "inputs[0] needs a name"),
    ("unknown datatype", {"inputs": [{**U8, "datatype": "FLOAT"}]}, "input 'x': unknown datatype 'FLOAT'"),
    ("BF16", {"inputs": [{**U8, "datatype": "BF16"}]}, "unknown datatype 'BF16'"),
    ("datatype not a string", {"inputs": [{**U8, "datatype": 5}]}, "unknown datatype 5"),
    ("no shape", {"inputs": [{**U8, "shape": None}]}, "input 'x': shape"),
    ("shape a number", {"inputs": [{**U8, "shape": 2}]}, "input 'x': shape"),
    ("negative dim", {"inputs": [{**U8, "shape": [-2]}]}, "non-negative integers, got -2"),
    ("float dim", {"inputs": [{**U8, "shape": [2.0]}]}, "non-negative integers, got 2.0"),
    ("bool dim", {"inputs": [{**U8, "shape": [True, 2]}]}, "non-negative integers, got True"),
    ("string dim", {"inputs": [{**U8, "shape": ["2"]}]}, "non-negative integers"),
    ("overflowing dims", {"inputs": [{**U8, "shape": [2**63 - 1, 2**63 - 1, 4]}]}, "more than"),
    ("too many dims", {"inputs": [{**U8, "shape": [1] * 17}]}, "17 dimensions"),
    ("too few elements", {"inputs": [{**U8, "shape": [3]}]}, "data holds 2 elements but shape [3] needs 3"),
    ("too many elements", {"inputs": [{**U8, "data": [1, 2, 3]}]}, "holds 3 elements"),
    ("data not a list", {"inputs": [{**U8, "data": "12"}]}, "data must be a JSON array"),
    ("data a number", {"inputs": [{**U8, "shape": [], "data": 1}]}, "data must be a JSON array"),
    ("ragged data", {"inputs": [{**U8, "shape": [3], "data": [[1], [2, 3]]}]}, "regular"),
    ("mixed depth", {"inputs": [{**U8, "data": [1, [2]]}]}, "regular"),
    ("strings for numbers", {"inputs": [{**U8, "data": ["1", "2"]}]}, "integers"),
    ("floats for integers", {"inputs": [{**U8, "data": [1.5, 2]}]}, "integers"),
    ("bools for integers", {"inputs": [{**U8, "data": [True, False]}]}, "integers"),
    ("null in data", {"inputs": [{**U8, "data": [1, None]}]}, "integers"),
    ("object in data", {"inputs": [{**U8, "data": [{}, 1]}]}, "integers"),
    ("uint8 overflow", {"inputs": [{**U8, "data": [1, 256]}]}, "out of the range of UINT8"),
    ("uint8 negative", {"inputs": [{**U8, "data": [-1, 2]}]}, "out of the range of UINT8"),
    ("int64 overflow", {"inputs": [{**U8, "datatype": "INT64", "data": [1, 2**63]}]}, "range of INT64"),
    ("uint64 float", {"inputs": [{**U8, "datatype": "UINT64", "data": [0.5, 2**64 - 1]}]}, "integers, got 0.5"),
    ("uint64 negative", {"inputs": [{**U8, "datatype": "UINT64", "data": [-1, 2**64 - 1]}]}, "range of UINT64"),
    ("fp32 overflow", {"inputs": [{**U8, "datatype": "FP32", "data": [1.0, 1e39]}]}, "range of FP32"),
    ("fp16 overflow", {"inputs": [{**U8, "datatype": "FP16", "data": [1.0, 70000]}]}, "range of FP16"),
    ("strings for floats", {"inputs": [{**U8, "datatype": "FP32", "data": ["1", "2"]}]}, "numbers"),
    ("bools for floats", {"inputs": [{**U8, "datatype": "FP64", "data": [True, False]}]}, "numbers"),
    ("numbers for BOOL", {"inputs": [{**U8, "datatype": "BOOL", "data": [1, 0]}]}, "true or false"),
    ("numbers for BYTES", {"inputs": [{**U8, "datatype": "BYTES", "data": ["a", 1]}]}, "strings, got 1"),
    ("too many strings", {"inputs": [{**U8, "datatype": "BYTES", "data": ["a", "b", "c"]}]}, "more elements"),
    ("strings too deep", {"inputs": [{**U8, "datatype": "BYTES", "shape": [1], "data": [["a"]]}]}, "deeper"),
    ("duplicate inputs", {"inputs": [U8, U8]}, "input 'x' is given more than once"),
    ("data and binary", {"inputs": [{**U8, "parameters": {"binary_data_size": 2}}]}, "not both"),
    ("no data", {"inputs": [{k: v for k, v in U8.items() if k != "data"}]}, "no data"),
    ("null data", {"inputs": [{**U8, "data": None}]}, "data must be a JSON array"),
    ("parameters a list", {"inputs": [{**U8, "parameters": []}]}, "parameters of input 'x'"),
    ("bad binary size", {"inputs": [{**BIN, "parameters": {"binary_data_size": -8}}]}, "binary_data_size must"),
    ("binary without header", {"inputs": [BIN]}, "Inference-Header-Content-Length"),
    ("shared memory", {"inputs": [{**U8, "parameters": {"shared_memory_region": "r"}}]}, "shared memory"),
    ("id a number", {"id": 7, "inputs": [U8]}, "request id"),
    ("request parameters", {"parameters": "x", "inputs": [U8]}, "parameters of the request"),
    ("binary_data_output", {"parameters": {"binary_data_output": 1}, "inputs": [U8]}, "binary_data_output"),
    ("negative timeout", {"parameters": {"timeout": -1}, "inputs": [U8]}, "timeout"),
    ("float timeout", {"parameters": {"timeout": 1.5}, "inputs": [U8]}, "timeout"),
    ("outputs an object", {"inputs": [U8], "outputs": {"name": "y"}}, "'outputs'"),
    ("output a string", {"inputs": [U8], "outputs": ["y"]}, "outputs[0]"),
    ("output no name", {"inputs": [U8], "outputs": [{"parameters": {}}]}, "outputs[0] needs a name"),
    ("duplicate outputs", {"inputs": [U8], "outputs": [{"name": "y"}, {"name": "y"}]}, "output 'y' is requested"),
    ("binary_data not bool", {"inputs": [U8], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}, "y"),
    ("classification", {"inputs": [U8], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}, "class"),
]


@pytest.mark.parametrize(("doc", "expected"), [c[1:] for c in MALFORMED_JSON], ids=[c[0] for c in MALFORMED_JSON])
def test_malformed_json_requests_are_400(doc: Any, expected: str) -> None:
    assert expected in rejects(orjson.dumps(doc))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b'{"inputs": [', "not valid JSON"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', "not valid JSON"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e400]}]}', "not valid JSON"),
        (b'{"inputs": [{"name": "\\ud800", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        (one_input(shape=[1], data=[[[[1.0]]]]), "nested deeper"),
        (one_input(shape=[1], data=eval("[" * 80 + "1.0" + "]" * 80)), "regular"),  # deeper than numpy's 64
        (one_input(shape=[1], data="[" * 100 + "]" * 100), "data must be a JSON array"),
    ],
    ids=["empty", "binary junk", "truncated", "NaN", "inf", "lone surrogate", "deep", "nested", "very deep", "string"],
)
def test_malformed_bodies_are_400(body: bytes, expected: str) -> None:
    assert expected in rejects(body)


def binary_case(datatype: str, shape: list[int], size: int, data: bytes) -> tuple[bytes, int]:
    header = one_input(datatype=datatype, shape=shape, data=None, parameters={"binary_data_size": size})
    return header + data, len(header)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (binary_case("FP32", [2], 8, b"\0" * 7), "declare 8 bytes but 7 follow"),
        (binary_case("FP32", [2], 8, b"\0" * 9), "declare 8 bytes but 9 follow"),
        (binary_case("FP32", [2], 4, b"\0" * 4), "binary_data_size is 4 bytes but shape [2] of FP32 needs 8"),
        (binary_case("FP16", [3], 4, b"\0" * 4), "needs 6"),
        (binary_case("BOOL", [2], 2, b"\x01\x02"), "0 or 1"),
        (binary_case("BYTES", [2], 4, b"\0" * 4), "too small for 2 BYTES elements"),
        (binary_case("BYTES", [1], 6, struct.pack("<I", 5) + b"ab"), "runs past"),
        (binary_case("BYTES", [2], 9, struct.pack("<I", 1) + b"a" + struct.pack("<I", 0)[:3] + b"z"), "runs past"),
        (binary_case("BYTES", [2], 9, struct.pack("<I", 2) + b"ab" + b"\0\0\0"), "inside an element's length"),
        (binary_case("BYTES", [1], 7, struct.pack("<I", 1) + b"abc"), "2 bytes left over"),
    ],
    ids=[
        "short",
        "long",
        "size vs shape",
        "fp16 size",
        "bool byte",
        "bytes count",
        "overrun",
        "overrun 2",
        "cut",
        "extra",
    ],
)
def test_malformed_binary_data_is_400(case: tuple[bytes, int], expected: str) -> None:
    body, header_length = case
    assert expected in rejects(body, header_length)


def test_header_length_must_fit_the_body() -> None:
    body = one_input()
    assert "exceeds the body" in rejects(body, len(body) + 1)
    assert "byte count" in rejects(body, -1)
    assert "not valid JSON" in rejects(body, 0)
    assert "not valid JSON" in rejects(body, len(body) - 1)
    assert "declare 0 bytes but 3 follow" in rejects(body + b"abc", len(body))
    assert decode_request(body, header_length=len(body)).inputs[0].data.tolist() == [1.0, 2.0]


def test_random_mutations_raise_only_protocol_errors() -> None:
    """A seeded fuzz loop: bytes flipped, cut, spliced, header lengths shifted, JSON values swapped."""
    rng = random.Random(4)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    s = np.array([b"ab", b"", b"cde"], dtype=object)
    seeds = [
        client_request([("x", x, "FP32"), ("s", s, "BYTES"), ("b", np.array([True, False]), "BOOL")]),
        client_request([("x", x, "FP32"), ("s", s, "BYTES")], binary=False, request_id="abc"),
        client_request(
            [("x", x.astype(np.int8), "INT8")], outputs=[{"name": "y", "parameters": {"binary_data": True}}]
        ),
    ]
    junk: list[Any] = [None, True, -1, 0, 2**40, 2**70, 1.5, "", "FP32", "x" * 300, [], [-1], [[1]], {}, {"a": 1}]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(8000):
        body, header_length = rng.choice(seeds)
        mutated = bytearray(body)
        move = rng.randrange(6)
        if move == 0:
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        elif move == 1:
            del mutated[rng.randrange(len(mutated)) :]
        elif move == 2:
            at = rng.randrange(len(mutated))
            mutated[at:at] = rng.randbytes(rng.randint(1, 8))
        elif move == 3 and header_length is not None:
            header_length += rng.randint(-8, 8)
        else:
            end = header_length or len(body)
            doc = json.loads(body[:end])
            target = doc if rng.random() < 0.3 else rng.choice(doc["inputs"])
            key = rng.choice([*target.keys(), "parameters", "outputs", "data"])
            target[key] = rng.choice(junk) if rng.random() < 0.7 else {"binary_data_size": rng.choice(junk)}
            header = json.dumps(doc).encode()
            mutated = bytearray(header + body[end:])
            header_length = len(header) if header_length is not None else None
        try:
            decode_request(bytes(mutated), header_length=header_length)
            outcomes["ok"] += 1
        except ProtocolError:
            outcomes["error"] += 1
    assert outcomes["error"] > 3000 and outcomes["ok"] > 100


# -- responses --------------------------------------------------------------------------------


def always(flag: bool) -> Callable[[str], bool]:
    """A ``binary`` choice that is the same for every output."""
    return lambda _name: flag


def response(*tensors: Tensor, request_id: str | None = "req-9") -> InferResponse:
    return InferResponse(model_name="m", model_version="2", id=request_id, outputs=list(tensors))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_datatype_encodes(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    body, headers = encode_response(response(Tensor("y", datatype, array.shape, array)), binary=always(binary))
    result, arrays = client_result(body, headers)
    assert (result["model_name"], result["model_version"], result["id"]) == ("m", "2", "req-9")
    assert result["outputs"][0]["shape"] == [2, 3] and result["outputs"][0]["datatype"] == datatype
    assert ("Inference-Header-Content-Length" in headers) == binary
    assert_same(arrays["y"], array, datatype)


def test_binary_is_chosen_per_output_and_blobs_follow_in_order() -> None:
    a = np.arange(4, dtype=np.int32)
    b = np.linspace(0, 1, 6, dtype=np.float64).reshape(3, 2)
    c = np.array([[True], [False]])
    chosen = {"a": True, "b": False, "c": True}
    stale = {"binary_data_size": 99, "note": "kept"}  # e.g. copied from an input: never written as is
    body, headers = encode_response(
        response(Tensor("a", "INT32", (4,), a), Tensor("b", "FP64", (3, 2), b, stale), Tensor("c", "BOOL", (2, 1), c)),
        binary=chosen.__getitem__,
    )
    result, arrays = client_result(body, headers)
    assert [("data" in o, o.get("parameters")) for o in result["outputs"]] == [
        (False, {"binary_data_size": 16}),
        (True, {"note": "kept"}),
        (False, {"binary_data_size": 2}),
    ]
    assert len(body) == int(headers["Inference-Header-Content-Length"]) + 18
    for name, want, datatype in (("a", a, "INT32"), ("b", b, "FP64"), ("c", c, "BOOL")):
        assert_same(arrays[name], want, datatype)


def test_response_without_id_and_with_awkward_arrays() -> None:
    """No id: none written. Non-contiguous, big-endian or wider arrays are written as their datatype says."""
    wide = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    big = np.arange(3, dtype=">i4")
    for binary in (False, True):
        body, headers = encode_response(
            response(Tensor("w", "FP32", (3, 2), wide), Tensor("b", "INT32", (3,), big), request_id=None),
            binary=always(binary),
        )
        result, arrays = client_result(body, headers)
        assert "id" not in result
        assert_same(arrays["w"], wide.astype(np.float32), "FP32")
        assert_same(arrays["b"], big.astype("<i4"), "INT32")


def test_nan_and_inf_are_null_in_json_and_exact_in_binary() -> None:
    special = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    body, headers = encode_response(response(Tensor("y", "FP32", (4,), special)), binary=always(False))
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, None, 1.0]
    _, arrays = client_result(body, headers)
    assert np.isnan(arrays["y"][:3]).all()  # tritonclient reads null back as NaN
    body, headers = encode_response(response(Tensor("y", "FP32", (4,), special)), binary=always(True))
    _, arrays = client_result(body, headers)
    np.testing.assert_array_equal(arrays["y"], special)


def test_bytes_outputs_as_str_and_non_utf8_fall_back_to_binary() -> None:
    strings = np.array(["héllo", "", "x"], dtype=object)  # what ONNX Runtime returns for string outputs
    body, headers = encode_response(response(Tensor("s", "BYTES", (3,), strings)), binary=always(False))
    assert orjson.loads(body)["outputs"][0]["data"] == ["héllo", "", "x"]
    raw = np.array([b"\xff\xfe", b"ok"], dtype=object)
    body, headers = encode_response(response(Tensor("r", "BYTES", (2,), raw)), binary=always(False))
    result, arrays = client_result(body, headers)
    assert result["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert arrays["r"].tolist() == [b"\xff\xfe", b"ok"]


def test_a_full_round_trip_through_both_sides() -> None:
    """Decode a tritonclient request, answer it the way the client asked, read the answer back."""
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    body, length = client_request([("x", x, "FP32")], outputs=[{"name": "y", "parameters": {"binary_data": False}}])
    request: InferRequest = decode_request(body, header_length=length)
    y = request.inputs[0].data * 2
    out, headers = encode_response(
        InferResponse("m", "1", request.id, [Tensor("y", "FP32", y.shape, y)]), binary=request.wants_binary
    )
    assert headers == {"content-type": "application/json"}
    _, arrays = client_result(out, headers)
    np.testing.assert_array_equal(arrays["y"], x * 2)


def test_encode_json() -> None:
    assert encode_json({"error": "bad", "v": np.arange(2, dtype=np.int8)}) == b'{"error":"bad","v":[0,1]}'
