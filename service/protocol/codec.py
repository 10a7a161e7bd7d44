"""Decode KServe v2 inference requests and encode responses: JSON tensors and the binary tensor data extension.

Written here rather than taken from a library: the KServe and Triton Python packages pull in
their whole servers (or gevent clients) and validate with pydantic models per request, while this
hot path needs only orjson plus numpy and must turn every malformed body into one 400 line.

Requests. The body is one JSON object, or (with ``Inference-Header-Content-Length``) a JSON
header of that many bytes followed by the binary tensors of the inputs that carry
``parameters.binary_data_size``, in input order, their sizes adding up exactly to the rest of the
body. Binary data is little-endian and row-major; ``BOOL`` is one byte (0 or 1) per element;
``BYTES`` is a 4-byte little-endian length before each element. JSON ``data`` is a flat or nested
(row-major) array; numbers must be JSON numbers of the right kind (integers for integer types,
within range; ``true``/``false`` for ``BOOL``), ``BYTES`` elements are UTF-8 strings (as the
spec says: no base64). Shapes are checked, and their element counts computed with Python
integers and bounded, before anything is allocated. Binary inputs become read-only numpy views
of the body where aligned (a copy otherwise). Shared memory and the classification extension are
refused, not ignored.

Responses. Outputs go as JSON (a flat ``data`` list written by orjson straight from the numpy
array) or as binary data with ``parameters.binary_data_size``, as the caller's ``binary`` choice
says. JSON cannot carry NaN or infinity: orjson writes them as ``null`` (which Triton's client
reads back as NaN); ask for binary outputs to get exact values. A ``BYTES`` output that is not
UTF-8 cannot be a JSON string, so it is sent as binary data whatever was asked (clients read
``binary_data_size`` per output, so this stays within the protocol).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import orjson

from service.errors import TooLarge
from service.protocol.types import (
    DATATYPES,
    CodecLimits,
    InferRequest,
    InferResponse,
    ProtocolError,
    RequestedOutput,
    Tensor,
    datatype_to_numpy,
    numpy_to_datatype,
)

__all__ = [
    "DATATYPES",
    "CodecLimits",
    "ProtocolError",
    "datatype_to_numpy",
    "decode_request",
    "encode_json",
    "encode_response",
    "numpy_to_datatype",
    "parse_header_length",
]

_DEFAULT_LIMITS = CodecLimits()
_U32 = struct.Struct("<I")
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_INT_KINDS = "iu"
#: The smallest magnitudes that round to infinity in FP16 / FP32 (the largest finite value plus half a step).
_FLOAT_INF = {"FP16": 65520.0, "FP32": float(2**128 - 2**103)}
_NUMBER_KINDS = "iuf"
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "the shared memory extension is not supported",
    "classification": "the classification extension is not supported",
}


def encode_json(obj: Any) -> bytes:
    """``obj`` as compact JSON bytes (orjson; numpy arrays serialised natively)."""
    return orjson.dumps(obj, option=_NUMPY)


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a byte count (``None`` when absent)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ProtocolError("Inference-Header-Content-Length must be a byte count")
    return int(text)


def decode_request(body: bytes, *, header_length: int | None, limits: CodecLimits = _DEFAULT_LIMITS) -> InferRequest:
    """Decode an inference request body; every malformed body raises :class:`ProtocolError` (a body over
    ``limits.max_body_bytes`` raises ``TooLarge``)."""
    if len(body) > limits.max_body_bytes:
        raise TooLarge(f"the request body is larger than the limit of {limits.max_body_bytes} bytes")
    if header_length is None:
        json_end = len(body)
    elif not _is_count(header_length):
        raise ProtocolError("Inference-Header-Content-Length must be a byte count")
    elif header_length > len(body):
        raise ProtocolError(f"Inference-Header-Content-Length ({header_length}) exceeds the body ({len(body)} bytes)")
    else:
        json_end = header_length
    try:
        doc = orjson.loads(body if json_end == len(body) else memoryview(body)[:json_end])
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request header is not valid JSON: {exc.msg} at byte {exc.pos}") from exc
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object")

    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > limits.max_id_length):
        raise ProtocolError(f"the request id must be a string of at most {limits.max_id_length} characters")
    parameters = _parameters(doc.get("parameters"), "the request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("the binary_data_output parameter must be true or false")
    timeout = parameters.get("timeout")
    if timeout is not None and not _is_count(timeout):
        raise ProtocolError("the timeout parameter must be a non-negative integer (microseconds)")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' array")
    if len(raw_inputs) > limits.max_inputs:
        raise ProtocolError(f"the request has {len(raw_inputs)} inputs, over the limit of {limits.max_inputs}")
    headers = [_input_header(item, index, limits) for index, item in enumerate(raw_inputs)]
    names = [header.name for header in headers]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ProtocolError(f"input {duplicate!r} is given more than once")

    binary_sizes = [header.size for header in headers if header.size is not None]
    available = len(body) - json_end
    if binary_sizes and header_length is None:
        raise ProtocolError("binary_data_size needs the Inference-Header-Content-Length header")
    if sum(binary_sizes) != available:
        raise ProtocolError(
            f"the binary inputs declare {sum(binary_sizes)} bytes but {available} follow the JSON header"
        )

    outputs = _requested_outputs(doc.get("outputs"), limits)
    inputs: list[Tensor] = []
    offset = json_end
    for header in headers:
        if header.size is None:
            array = _from_json(header)
        else:
            array = _from_binary(header, body, offset, header.size)
            offset += header.size
        inputs.append(Tensor(header.name, header.datatype, header.shape, array, header.parameters))
    return InferRequest(request_id, inputs, outputs, parameters, binary_default)


def encode_response(response: InferResponse, *, binary: Callable[[str], bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers.

    ``binary(name)`` says whether an output goes as binary data. With any binary output the body is
    the JSON header followed by the blobs in output order, with ``Inference-Header-Content-Length``
    and ``content-type: application/octet-stream``; otherwise ``content-type: application/json``.
    The shape written is that of each output's array.
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.data.shape)}
        parameters = {key: value for key, value in tensor.parameters.items() if key != "binary_data_size"}
        as_binary = binary(tensor.name)
        if not as_binary:
            json_data = _json_data(tensor)
            if json_data is None:  # BYTES that are not UTF-8: no JSON string can carry them
                as_binary = True
            else:
                entry["data"] = json_data
        if as_binary:
            blob = _binary_data(tensor)
            blobs.append(blob)
            parameters["binary_data_size"] = len(blob)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        header["id"] = response.id
    header["outputs"] = outputs
    head = orjson.dumps(header, option=_NUMPY)
    if not blobs:
        return head, {"content-type": "application/json"}
    headers = {"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"}
    return b"".join([head, *blobs]), headers


# -- requests ---------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A short one-line rendering of a client's value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parameters(value: Any, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"the parameters of {owner} must be a JSON object")
    for key, reason in _UNSUPPORTED_PARAMETERS.items():
        if key in value:
            raise ProtocolError(f"{owner}: {reason}")
    return value


class _InputHeader(NamedTuple):
    """One input's JSON, checked; ``size`` is its ``binary_data_size`` (``None``: ``data`` holds it as JSON)."""

    name: str
    label: str  #: "input 'name'", for messages
    datatype: str
    shape: tuple[int, ...]
    elements: int
    size: int | None
    data: Any
    parameters: dict[str, Any]


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (``true`` is not one)."""
    return type(value) is int and value >= 0


def _input_header(item: Any, index: int, limits: CodecLimits) -> _InputHeader:
    if not isinstance(item, dict):
        raise ProtocolError(f"inputs[{index}] must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name or len(name) > limits.max_name_length:
        raise ProtocolError(f"inputs[{index}] needs a name of 1 to {limits.max_name_length} characters")
    label = f"input {name!r}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(f"{label}: unknown datatype {_show(datatype)}; expected one of {', '.join(DATATYPES)}")
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise ProtocolError(f"{label}: shape must be an array of dimensions")
    if len(shape) > limits.max_rank:
        raise ProtocolError(f"{label}: shape has {len(shape)} dimensions, over the limit of {limits.max_rank}")
    count = 1
    span = 1  # the product of the non-zero dims: numpy refuses to build even an empty array past intp
    for dim in shape:
        if not _is_count(dim):
            raise ProtocolError(f"{label}: shape dimensions must be non-negative integers, got {_show(dim)}")
        count *= dim  # Python integers: no overflow; bounded below before anything is allocated
        span *= max(dim, 1)
    if count > limits.max_elements:
        raise ProtocolError(f"{label}: shape {_show(shape)} holds more than {limits.max_elements} elements")
    if span > limits.max_elements:
        raise ProtocolError(f"{label}: shape {_show(shape)} spans more than {limits.max_elements} elements")
    parameters = _parameters(item.get("parameters"), label)
    size = parameters.get("binary_data_size")
    if size is not None and not _is_count(size):
        raise ProtocolError(f"{label}: binary_data_size must be a non-negative integer")
    if size is not None and "data" in item:
        raise ProtocolError(f"{label}: give either data or binary_data_size, not both")
    if size is None and "data" not in item:
        raise ProtocolError(f"{label}: no data (neither data nor binary_data_size)")
    return _InputHeader(name, label, datatype, tuple(shape), count, size, item.get("data"), parameters)


def _from_binary(header: _InputHeader, body: bytes, offset: int, size: int) -> np.ndarray:
    label, datatype, shape, count = header.label, header.datatype, header.shape, header.elements
    dtype = DATATYPES[datatype]
    if dtype is None:
        return _bytes_from_binary(label, count, body, offset, size).reshape(shape)
    needed = count * dtype.itemsize
    if size != needed:
        raise ProtocolError(
            f"{label}: binary_data_size is {size} bytes but shape {list(shape)} of {datatype} needs {needed}"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(body, dtype=np.uint8, count=count, offset=offset)
        if count and int(raw.max()) > 1:
            raise ProtocolError(f"{label}: BOOL elements must be the bytes 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return (array if array.flags.aligned else array.copy()).reshape(shape)


def _bytes_from_binary(label: str, count: int, body: bytes, offset: int, size: int) -> np.ndarray:
    """Elements of a binary BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    if count * _U32.size > size:
        raise ProtocolError(f"{label}: binary_data_size of {size} bytes is too small for {count} BYTES elements")
    end = offset + size
    items: list[bytes] = []
    position = offset
    for _ in range(count):
        if position + _U32.size > end:
            raise ProtocolError(f"{label}: BYTES data ends inside an element's length")
        (length,) = _U32.unpack_from(body, position)
        position += _U32.size
        if position + length > end:
            raise ProtocolError(f"{label}: a BYTES element of {length} bytes runs past binary_data_size")
        items.append(bytes(body[position : position + length]))
        position += length
    if position != end:
        raise ProtocolError(f"{label}: {end - position} bytes left over after {count} BYTES elements")
    return _object_array(items)


def _object_array(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _from_json(header: _InputHeader) -> np.ndarray:
    label, datatype, shape, count, data = header.label, header.datatype, header.shape, header.elements, header.data
    if not isinstance(data, list):
        raise ProtocolError(f"{label}: data must be a JSON array")
    if datatype == "BYTES":
        return _object_array([item.encode() for item in _flatten(header, str, "strings")]).reshape(shape)
    try:
        parsed = np.array(data)  # numpy infers bool / int64 / uint64 / float64; anything else is refused below
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"{label}: data must be a regular (non-ragged) array of numbers") from exc
    if parsed.ndim > max(len(shape), 1):
        raise ProtocolError(f"{label}: data is nested deeper than its shape allows")
    if parsed.size != count:
        raise ProtocolError(f"{label}: data holds {parsed.size} elements but shape {list(shape)} needs {count}")
    target = datatype_to_numpy(datatype)
    if count == 0:
        return np.empty(shape, dtype=target)
    kind = parsed.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise ProtocolError(f"{label}: BOOL data must be true or false")
        return parsed.reshape(shape)
    if target.kind in _INT_KINDS:
        info = np.iinfo(target)
        if kind == "f":  # real floats, or integers past INT64 mixed with others (numpy widens those to float64)
            exact = _flatten(header, int, "integers")
            if min(exact) < info.min or max(exact) > info.max:
                raise ProtocolError(f"{label}: data out of the range of {datatype}")
            return np.array(exact, dtype=target).reshape(shape)
        if kind not in _INT_KINDS:
            raise ProtocolError(f"{label}: {datatype} data must be integers")
        if parsed.dtype != target and (int(parsed.min()) < info.min or int(parsed.max()) > info.max):
            raise ProtocolError(f"{label}: data out of the range of {datatype}")
        return parsed.astype(target, copy=False).reshape(shape)
    if kind not in _NUMBER_KINDS:
        raise ProtocolError(f"{label}: {datatype} data must be numbers")
    limit = _FLOAT_INF.get(datatype)
    if limit is not None and float(np.abs(parsed).max()) >= limit:
        raise ProtocolError(f"{label}: data out of the range of {datatype}")
    return parsed.astype(target).reshape(shape)


def _flatten(header: _InputHeader, kind: type, what: str) -> list[Any]:
    """Every element of a (nested) JSON array, row-major, each checked to be a ``kind`` (``bool`` is not ``int``)."""
    label, shape, count = header.label, header.shape, header.elements
    out: list[Any] = []

    def walk(items: list[Any], level: int) -> None:
        if level >= max(len(shape), 1):
            raise ProtocolError(f"{label}: data is nested deeper than its shape allows")
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
                continue
            if not isinstance(item, kind) or isinstance(item, bool):
                raise ProtocolError(f"{label}: data must be {what}, got {_show(item)}")
            if len(out) >= count:
                raise ProtocolError(f"{label}: data holds more elements than shape {list(shape)} needs")
            out.append(item)

    walk(header.data, 0)
    if len(out) != count:
        raise ProtocolError(f"{label}: data holds {len(out)} elements but shape {list(shape)} needs {count}")
    return out


def _requested_outputs(value: Any, limits: CodecLimits) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError("'outputs' must be an array")
    if len(value) > limits.max_outputs:
        raise ProtocolError(f"the request asks for {len(value)} outputs, over the limit of {limits.max_outputs}")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ProtocolError(f"outputs[{index}] must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > limits.max_name_length:
            raise ProtocolError(f"outputs[{index}] needs a name of 1 to {limits.max_name_length} characters")
        if name in seen:
            raise ProtocolError(f"output {name!r} is requested more than once")
        seen.add(name)
        parameters = _parameters(item.get("parameters"), f"output {name!r}")
        flag = parameters.get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise ProtocolError(f"output {name!r}: binary_data must be true or false")
        outputs.append(RequestedOutput(name, flag))
    return outputs or None


# -- responses --------------------------------------------------------------------------------


def _native(tensor: Tensor) -> np.ndarray:
    """The tensor's data as a C-contiguous, little-endian array of its datatype's dtype."""
    return np.ascontiguousarray(tensor.data, dtype=datatype_to_numpy(tensor.datatype))


def _json_data(tensor: Tensor) -> np.ndarray | list[str] | None:
    """The flat JSON ``data`` of an output (``None`` for BYTES that are not UTF-8)."""
    if tensor.datatype != "BYTES":
        return _native(tensor).reshape(-1)
    strings: list[str] = []
    for item in tensor.data.reshape(-1):
        if isinstance(item, str):
            strings.append(item)
            continue
        try:
            strings.append(_element_bytes(item).decode())
        except UnicodeDecodeError:
            return None
    return strings


def _element_bytes(item: Any) -> bytes:
    """One BYTES element as bytes (``str`` as UTF-8; anything else by its ``str``)."""
    if isinstance(item, bytes):
        return item
    return (item if isinstance(item, str) else str(item)).encode()


def _binary_data(tensor: Tensor) -> bytes:
    """The binary tensor data of an output (BYTES: each element's 4-byte length, then the element)."""
    if tensor.datatype != "BYTES":
        return _native(tensor).tobytes()
    parts: list[bytes] = []
    for item in tensor.data.reshape(-1):
        raw = _element_bytes(item)
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)
