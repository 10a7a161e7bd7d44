"""Checks an ONNX model must pass before it is trusted: static ones, then one real run.

Written here rather than taken from a library: ``onnx.checker`` allows any operator domain, never
bounds declared sizes, and accepts symlinks and unknown external-data keys. These checks cover
that; ``onnx.checker.check_model`` still runs after them, then a real ONNX Runtime session and one
warm-up inference (:func:`validate_onnx`, which :func:`optimizer.io.load_model` runs in a sandbox).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from optimizer.data import SampleData
from optimizer.errors import InvalidData, InvalidModel, UnsupportedModel, first_line
from optimizer.safezip import ZipLimits
from optimizer.sandbox import is_out_of_memory

MODEL_FILE = "model.onnx"
_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})
_FULL_CHECK_MAX_NODES = 50_000  # onnx.checker's full check (strict shape inference) above this is slow


class ModelLimits(BaseModel):
    """Bounds a model must stay within before anything of it is allocated or run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_file_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_elements: int = Field(default=2**31, gt=0)  # of any declared tensor or initializer
    allowed_domains: frozenset[str] = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
    zip: ZipLimits = ZipLimits()


# --------------------------------------------------------------------------------------------
# Static ONNX checks


def check_onnx_static(path: Path, limits: ModelLimits = ModelLimits()) -> list[str]:  # noqa: B008
    """Every check that does not run the model; returns the external-data files (relative paths).

    File size, protobuf parse, operator domains, declared and initializer sizes, external-data
    references, then ``onnx.checker``. Raises InvalidModel or UnsupportedModel with one line.
    """
    path = Path(path)
    check_file_size(path, limits)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InvalidModel(f"invalid ONNX model: {first_line(exc)}") from exc
    if not model.HasField("graph"):
        raise InvalidModel("invalid ONNX model: it has no graph")
    graphs, nodes = _walk(model)
    _check_domains(model, nodes, limits)
    _check_sizes(model, graphs, nodes, limits)
    files = _check_external_data(_tensors(graphs, nodes), path.parent)
    full = len(nodes) <= _FULL_CHECK_MAX_NODES
    del model, graphs, nodes
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except Exception as exc:  # ValidationError, InferenceError, or a protobuf error
        raise InvalidModel(f"invalid ONNX model: {_scrub(first_line(exc), path.parent)}") from exc
    return files


def check_file_size(path: Path, limits: ModelLimits) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidModel(f"cannot read the model file: {exc.strerror or exc}") from exc
    if size > limits.max_file_bytes:
        raise InvalidModel(f"model file is {size} bytes, more than the limit of {limits.max_file_bytes}")
    return size


def _walk(model: onnx.ModelProto) -> tuple[list[onnx.GraphProto], list[onnx.NodeProto]]:
    """Every graph (main and nested) and every node (of graphs and of local functions)."""
    graphs = [model.graph]
    stack = list(model.graph.node) + [n for f in model.functions for n in f.node]
    nodes: list[onnx.NodeProto] = []
    while stack:  # iterative: a fuzzed model's nesting must not overflow Python's stack
        node = stack.pop()
        nodes.append(node)
        for attr in node.attribute:
            for sub in [attr.g] * attr.HasField("g") + list(attr.graphs):
                graphs.append(sub)
                stack.extend(sub.node)
    return graphs, nodes


def _sparse(graphs: list[onnx.GraphProto], nodes: list[onnx.NodeProto]) -> Iterator[onnx.SparseTensorProto]:
    for graph in graphs:
        yield from graph.sparse_initializer
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor
            yield from attr.sparse_tensors


def _tensors(graphs: list[onnx.GraphProto], nodes: list[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model: initializers and tensor-valued node attributes."""
    for graph in graphs:
        yield from graph.initializer
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
    for sparse in _sparse(graphs, nodes):
        yield sparse.values
        yield sparse.indices


def _check_domains(model: onnx.ModelProto, nodes: list[onnx.NodeProto], limits: ModelLimits) -> None:
    def norm(domain: str) -> str:
        return "" if domain == "ai.onnx" else domain

    allowed = {norm(d) for d in limits.allowed_domains}
    local_functions = {(f.domain, f.name) for f in model.functions}
    local_domains = {f.domain for f in model.functions}
    imports = list(model.opset_import) + [o for f in model.functions for o in f.opset_import]
    for domain in [o.domain for o in imports if norm(o.domain) not in local_domains] + [
        n.domain for n in nodes if (n.domain, n.op_type) not in local_functions
    ]:
        if norm(domain) not in allowed:
            raise UnsupportedModel(f"unknown operator domain '{_clip(domain)}' (custom op libraries are never loaded)")


def _check_sizes(
    model: onnx.ModelProto, graphs: list[onnx.GraphProto], nodes: list[onnx.NodeProto], limits: ModelLimits
) -> None:
    for tensor in _tensors(graphs, nodes):
        _check_elements(tensor.name, list(tensor.dims), "tensor", limits)
    for sparse in _sparse(graphs, nodes):  # ONNX Runtime makes sparse initializers dense
        _check_elements(sparse.values.name, list(sparse.dims), "sparse tensor", limits)
    for graph in graphs:
        for value in [*graph.input, *graph.output, *graph.value_info]:
            for dims in _declared_dims(value.type):
                _check_elements(value.name, dims, "declared shape of", limits)
    for function in model.functions:
        for value in getattr(function, "value_info", []):
            for dims in _declared_dims(value.type):
                _check_elements(value.name, dims, "declared shape of", limits)


def _declared_dims(root: onnx.TypeProto) -> Iterator[list[int]]:
    stack = [root]
    while stack:
        kind = stack[-1].WhichOneof("value")
        current = stack.pop()
        if kind in ("tensor_type", "sparse_tensor_type"):
            shape = getattr(current, kind).shape
            yield [d.dim_value for d in shape.dim if d.HasField("dim_value")]
        elif kind in ("sequence_type", "optional_type"):
            stack.append(getattr(current, kind).elem_type)
        elif kind == "map_type":
            stack.append(current.map_type.value_type)


def _check_elements(name: str, dims: list[int], what: str, limits: ModelLimits) -> None:
    if any(d < 0 for d in dims):
        raise InvalidModel(f"invalid ONNX model: {what} '{_clip(name)}' has a negative dimension")
    if 0 in dims:
        return
    count = 1
    for dim in dims:  # stops early: a fuzzed shape's product could be astronomically large
        count *= dim
        if count > limits.max_elements:
            raise InvalidModel(
                f"invalid ONNX model: {what} '{_clip(name)}' has more than {limits.max_elements} elements"
            )


def _check_external_data(tensors: Iterator[onnx.TensorProto], folder: Path) -> list[str]:
    files: set[str] = set()
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        name = _clip(tensor.name)
        entries: dict[str, str] = {}
        for entry in tensor.external_data:
            if entry.key not in _EXTERNAL_KEYS or entry.key in entries:
                kind = "unknown" if entry.key not in _EXTERNAL_KEYS else "repeated"
                raise InvalidModel(
                    f"invalid ONNX model: tensor '{name}' has {kind} external-data key '{_clip(entry.key)}'"
                )
            entries[entry.key] = entry.value
        relative = safe_location(entries.get("location", ""), folder, name)
        size = (folder / relative).stat().st_size
        offset = _non_negative(entries.get("offset", "0"), "offset", name)
        length = _non_negative(entries["length"], "length", name) if "length" in entries else 0
        if offset + length > size:
            raise InvalidModel(f"invalid ONNX model: external data of tensor '{name}' lies past its file's end")
        files.add(relative)
    return sorted(files)


def safe_location(location: str, folder: Path, name: str) -> str:
    """The location as a clean relative path inside ``folder``, refusing anything that escapes."""

    def refuse(why: str) -> InvalidModel:
        return InvalidModel(f"invalid ONNX model: external data of tensor '{name}' {why}")

    if not location:
        raise refuse("has no location")
    pure = PurePosixPath(location)
    if pure.is_absolute() or "\\" in location or re.match(r"^[A-Za-z]:", location):
        raise refuse("uses an absolute path")
    if "\x00" in location or "_ORT_MEM_ADDR_" in location:
        raise refuse("has an invalid location")
    parts = location.split("/")
    if ".." in parts:
        raise refuse("leaves the model's folder")
    if "." in parts or "" in parts:
        raise refuse("has an invalid location")
    if pure.parts[0] == MODEL_FILE:
        raise refuse(f"may not be named {MODEL_FILE}")
    current = folder
    for part in pure.parts:
        current = current / part
        if current.is_symlink():
            raise refuse("goes through a symbolic link")
    if not current.is_file():
        raise refuse("refers to a missing file")
    return pure.as_posix()


def _non_negative(value: str, key: str, name: str) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", value.strip()):
        raise InvalidModel(f"invalid ONNX model: external-data {key} of tensor '{name}' is not a non-negative integer")
    return int(value)


# --------------------------------------------------------------------------------------------
# Running it once


_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def validate_onnx(
    path: Path,
    limits: ModelLimits = ModelLimits(),  # noqa: B008 - frozen
    example: SampleData | None = None,
) -> list[str]:
    """Static checks, a real ONNX Runtime session and one warm-up inference.

    The warm-up feeds ``example`` (a few samples) when given, else zeros shaped like the declared
    inputs with dynamic dimensions set to 1. Returns the external-data files (relative paths).
    Meant to run inside :func:`optimizer.sandbox.run_isolated`: a malformed model can crash ORT.
    """
    files = check_onnx_static(path, limits)
    warm_up(Path(path), example)
    return files


def warm_up(path: Path, example: SampleData | None = None) -> None:
    """Create a CPU session for ``path`` and run one inference (InvalidModel when either fails)."""
    from optimizer.runtime import RuntimeOptions, create_session

    threads = os.environ.get("OMP_NUM_THREADS", "")  # set by the sandbox's cpu_threads
    intra = int(threads) if threads.isdigit() else 0
    try:
        session = create_session(path, RuntimeOptions(device="cpu", intra_op_threads=intra))
    except InvalidModel as exc:
        if exc.__cause__ is not None and is_out_of_memory(exc.__cause__):
            raise MemoryError(str(exc)) from exc
        raise InvalidModel(f"invalid ONNX model: {_scrub(str(exc), path.parent)}") from exc
    feed = _warm_up_feed(session.get_inputs(), example)
    try:
        session.run(None, feed)
    except Exception as exc:  # onnxruntime's own exception types
        if is_out_of_memory(exc):
            raise MemoryError(first_line(exc)) from exc
        message = _scrub(first_line(exc), path.parent)
        raise InvalidModel(f"model fails its warm-up inference: {message}") from exc


def _warm_up_feed(inputs: list[Any], example: SampleData | None) -> dict[str, np.ndarray]:
    for node in inputs:
        if node.type not in _ORT_DTYPES:
            raise UnsupportedModel(f"input '{_clip(node.name)}' has type {node.type}, which cannot be fed")
    if example is None:
        feed = {}
        for node in inputs:
            shape = [d if isinstance(d, int) and d >= 0 else 1 for d in node.shape]
            dtype = _ORT_DTYPES[node.type]
            feed[node.name] = np.full(shape, "", dtype=object) if dtype is np.object_ else np.zeros(shape, dtype)
        return feed
    names = [node.name for node in inputs]
    missing = [n for n in names if n not in example.inputs]
    if missing:
        raise InvalidData(
            f"sample data has no array for model input {', '.join(missing)} (expected {', '.join(names)})"
        )
    if len(example) == 0:
        raise InvalidData("sample data holds no samples")
    fixed = [n.shape[0] for n in inputs if n.shape and isinstance(n.shape[0], int) and n.shape[0] > 0]
    batch = example.batch(fixed[0] if fixed else min(len(example), 8))
    for node in inputs:
        expected = np.dtype(_ORT_DTYPES[node.type])
        got = batch[node.name].dtype
        if expected != np.object_ and got != expected:
            raise InvalidData(f"sample array '{node.name}' has dtype {got}, the model expects {expected}")
    return {n: batch[n] for n in names}


# --------------------------------------------------------------------------------------------
# Small helpers


def _clip(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scrub(text: str, folder: Path) -> str:
    """Remove the model's (temporary) folder from a third-party message."""
    return text.replace(str(folder) + os.sep, "").replace(str(folder), "<model folder>")
