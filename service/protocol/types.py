"""KServe v2 datatypes and the request / response objects the codec produces and consumes.

The datatype names are the Open Inference Protocol's. Binary tensor data is little-endian, so the
fixed-size numpy dtypes here are explicitly little-endian; ``BYTES`` has no fixed-size dtype
(``None`` in :data:`DATATYPES`) and is carried as a 1-D-reshaped numpy object array of ``bytes``.
``BF16`` (no numpy dtype) is not served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from service.errors import BadRequest

#: Every datatype the codec accepts, with its numpy dtype (``None`` for ``BYTES``: an object array of ``bytes``).
DATATYPES: dict[str, np.dtype[Any] | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": None,
}

_BY_KIND_SIZE: dict[tuple[str, int], str] = {
    (dtype.kind, dtype.itemsize): name for name, dtype in DATATYPES.items() if dtype is not None
}


class ProtocolError(BadRequest):
    """A malformed inference request (400); the message is one line naming the input at fault."""


def numpy_to_datatype(dtype: DTypeLike) -> str:
    """The KServe v2 datatype name of a numpy dtype (strings, bytes and objects are ``BYTES``).

    Raises ``ValueError`` for a dtype the protocol cannot carry (complex, datetime, ...): that is a
    property of a model, not of a request, so the caller decides how to report it.
    """
    resolved = np.dtype(dtype)
    if resolved.kind in "OSU":
        return "BYTES"
    name = _BY_KIND_SIZE.get((resolved.kind, resolved.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {resolved} has no KServe v2 datatype")
    return name


def datatype_to_numpy(name: str) -> np.dtype[Any]:
    """The numpy dtype of a KServe v2 datatype name (``BYTES``: object); an unknown name is a ProtocolError."""
    if name not in DATATYPES:
        raise ProtocolError(f"unknown datatype {str(name)[:32]!r}; expected one of {', '.join(DATATYPES)}")
    dtype = DATATYPES[name]
    return np.dtype(object) if dtype is None else dtype


@dataclass(slots=True)
class Tensor:
    """One named tensor: ``data`` has ``shape`` and the numpy dtype of ``datatype``.

    Tensors decoded from binary request data may be read-only views of the request body.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` is its ``binary_data`` parameter (``None``: not given)."""

    name: str
    binary: bool | None


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request.

    ``outputs`` is ``None`` when the client named none (every output is returned); ``binary_default``
    is the request's ``binary_data_output`` parameter. ``parameters`` holds the request parameters
    as sent; ``timeout`` there, when present, is a validated non-negative integer (microseconds, as
    Triton's clients send it).
    """

    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None
    parameters: dict[str, Any]
    binary_default: bool

    def wants_binary(self, name: str) -> bool:
        """Whether output ``name`` goes back as binary data: its own ``binary_data``, else ``binary_data_output``."""
        for output in self.outputs or ():
            if output.name == name and output.binary is not None:
                return output.binary
        return self.binary_default


@dataclass(slots=True)
class InferResponse:
    """The outputs of one request, with the model and version that computed them and the request's id."""

    model_name: str
    model_version: str
    id: str | None
    outputs: list[Tensor]


@dataclass(frozen=True)
class CodecLimits:
    """Bounds checked while decoding, before anything of that size is allocated."""

    max_body_bytes: int = 64 << 20
    max_elements: int = 1 << 26  #: per tensor
    max_inputs: int = 64
    max_outputs: int = 64
    max_rank: int = 16
    max_id_length: int = 256
    max_name_length: int = 256  #: tensor names
