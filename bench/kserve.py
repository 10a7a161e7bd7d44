"""KServe v2 request bodies (JSON and the binary tensor extension) and response decoding, for the benchmarks.

Written here rather than taken from ``tritonclient``: that package is not a dependency, and the
benchmark only needs to build each request body once (orjson, numpy) and read a response back to
check it against in-process ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

#: KServe v2 datatype names of the numpy dtypes ONNX Runtime takes.
DATATYPES: dict[str, str] = {
    "float32": "FP32",
    "float64": "FP64",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "int16": "INT16",
    "int8": "INT8",
    "uint64": "UINT64",
    "uint32": "UINT32",
    "uint16": "UINT16",
    "uint8": "UINT8",
    "bool": "BOOL",
}
_DTYPES = {name: np.dtype(dtype) for dtype, name in DATATYPES.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class HttpRequest:
    """One pre-encoded POST: path, body and headers; ``samples`` is its batch size (for samples/s)."""

    path: str
    body: bytes
    headers: Mapping[str, str]
    samples: int = 1


def json_request(path: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = ()) -> HttpRequest:
    """A KServe v2 JSON inference request (flat row-major ``data``)."""
    body: dict[str, Any] = {
        "inputs": [
            {"name": name, "datatype": DATATYPES[array.dtype.name], "shape": list(array.shape), "data": array.ravel()}
            for name, array in inputs.items()
        ]
    }
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    encoded = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return HttpRequest(path, encoded, {"Content-Type": "application/json"}, _batch(inputs))


def binary_request(path: str, inputs: Mapping[str, np.ndarray], binary_output: bool = True) -> HttpRequest:
    """A KServe v2 request with the binary tensor extension, as ``tritonclient.http`` sends it by default.

    A JSON header (each input with ``parameters.binary_data_size``; ``binary_data_output`` asks for
    binary outputs) followed by the raw little-endian tensors in input order;
    ``Inference-Header-Content-Length`` is the header's size.
    """
    arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "datatype": DATATYPES[array.dtype.name],
                "shape": list(array.shape),
                "parameters": {"binary_data_size": array.nbytes},
            }
            for name, array in arrays.items()
        ]
    }
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    encoded = orjson.dumps(header)
    body = encoded + b"".join(
        array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes() for array in arrays.values()
    )
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(encoded))}
    return HttpRequest(path, body, headers, _batch(inputs))


def decode_response(body: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The outputs of a KServe v2 response (JSON or binary extension) by name."""
    length = headers.get(HEADER_LENGTH) or headers.get(HEADER_LENGTH.lower())
    size = int(length) if length is not None else len(body)
    document = orjson.loads(body[:size])
    offset = size
    outputs: dict[str, np.ndarray] = {}
    for item in document["outputs"]:
        dtype = _DTYPES[item["datatype"]]
        nbytes = (item.get("parameters") or {}).get("binary_data_size")
        if nbytes is not None:
            array = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=nbytes // dtype.itemsize, offset=offset)
            offset += nbytes
        else:
            array = np.asarray(item["data"], dtype=dtype)
        outputs[item["name"]] = array.reshape(item["shape"])
    return outputs


def _batch(inputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1
