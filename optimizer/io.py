"""Load and validate models; describe ONNX interfaces; convert PyTorch programs to ONNX.

:func:`load_model` is the one entry point: it sniffs the format from the bytes, converts a
TorchScript or torch.export (.pt2) program to ONNX in a sandboxed child process, validates every
model in another sandboxed child (static checks, then a real ONNX Runtime session and one warm-up
inference) and leaves the result as ``work_dir/model.onnx``.

Written here rather than taken from a library, and why:

* the ONNX sniff walks only the top-level protobuf fields (a few bytes each, payloads skipped):
  the parent process must not deserialise an untrusted model, and a full parse of a 2 GiB file
  just to name its format would double the memory; the full parse happens in the sandbox;
* the static checks (domains, declared sizes, external-data paths) cover what ``onnx.checker``
  does not: it allows any operator domain, never bounds declared sizes, and accepts symlinks and
  unknown external-data keys. ``onnx.checker.check_model`` still runs after them.

PyTorch files are code: TorchScript goes through ``torch.jit.load`` (whose unpickler is restricted
to tensors and TorchScript classes); ``torch.export.load`` falls back to unrestricted
``torch.load`` internally, so it runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (torch's own switch)
and archives holding pickled Python objects or compiled native code are refused beforehand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.descriptor import FieldDescriptor

from optimizer.artifact import Dim, ModelArtifact, TensorSpec
from optimizer.convert import SourceFormat, convert_torch_to_onnx
from optimizer.data import SampleData
from optimizer.errors import ConversionFailed, InvalidModel, SandboxError, UnsupportedModel
from optimizer.onnx_checks import (
    MODEL_FILE,
    ModelLimits,
    check_file_size,
    check_onnx_static,
    safe_location,
    validate_onnx,
    warm_up,
)
from optimizer.safezip import ZipLimits, check_zip
from optimizer.sandbox import SandboxCrashed, SandboxLimits, run_isolated

__all__ = [
    "MODEL_FILE",
    "ModelLimits",
    "SourceFormat",
    "check_onnx_static",
    "convert_torch_to_onnx",
    "describe_onnx",
    "load_model",
    "sniff_format",
    "validate_onnx",
    "warm_up",
]

_PICKLE_ADVICE = "save PyTorch models with torch.jit.save or torch.export.save"


# --------------------------------------------------------------------------------------------
# Describing an ONNX file (the seam passes use)


def _numpy_dtype(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.STRING:
        return "str"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError) as exc:
        raise InvalidModel(f"unsupported tensor element type {elem_type}") from exc


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dims: list[Dim] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorSpec(name=value.name, dtype=_numpy_dtype(tensor.elem_type), shape=tuple(dims))


def describe_onnx(path: Path, source_format: str = "onnx") -> ModelArtifact:
    """Read an ONNX file's interface (inputs that are not initializers, outputs, opset, size)."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    size = sum(p.stat().st_size for p in _model_files(path, model))
    return ModelArtifact(
        path=path,
        source_format=source_format,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        size_bytes=size,
    )


def _model_files(path: Path, model: onnx.ModelProto) -> list[Path]:
    """The model file plus the external-data files it references (for the size on disk)."""
    files = {path}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(path.parent / entry.value)
    return [f for f in files if f.exists()]


# --------------------------------------------------------------------------------------------
# Sniffing


def sniff_format(path: Path, zip_limits: ZipLimits | None = None) -> SourceFormat:
    """The model format decided from the file's bytes (never its name); UnsupportedModel otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise UnsupportedModel(f"cannot read the model file: {exc.strerror or exc}") from exc
    if not head:
        raise UnsupportedModel("the model file is empty")
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return _sniff_zip(path, zip_limits or ZipLimits())
    if head[0] == 0x80:
        raise UnsupportedModel(f"a pickled Python object is not accepted: {_PICKLE_ADVICE}")
    if _starts_like_onnx(head) or _looks_like_onnx(path):
        return "onnx"
    raise UnsupportedModel("not a recognised model format (ONNX, TorchScript or torch.export .pt2)")


def _sniff_zip(path: Path, limits: ZipLimits) -> SourceFormat:
    members = check_zip(path, limits, InvalidModel)
    inner = {name.split("/", 1)[1] for name in (m.filename for m in members) if "/" in name}
    if "archive_format" in inner and any(n.startswith("models/") and n.endswith(".json") for n in inner):
        return "torch_export"
    if "data.pkl" in inner and ("constants.pkl" in inner or any(n.startswith("code/") for n in inner)):
        return "torchscript"
    if "data.pkl" in inner:
        raise UnsupportedModel(f"a pickled PyTorch checkpoint (torch.save) is not accepted: {_PICKLE_ADVICE}")
    raise UnsupportedModel("zip archive is neither a TorchScript nor a torch.export (.pt2) model")


def _starts_like_onnx(head: bytes) -> bool:
    """True when the file opens with ModelProto's ir_version field, as onnx and torch write it.

    A truncated or bit-flipped model still opens this way; it is then the validator (in the
    sandbox) that reports it as an invalid ONNX model.
    """
    return len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] < 0x80


def _wire_types() -> dict[int, int]:
    """ModelProto's field numbers and their protobuf wire types (2: length-delimited, 0: varint)."""
    delimited = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
    return {f.number: 2 if f.type in delimited else 0 for f in onnx.ModelProto.DESCRIPTOR.fields}


def _read_varint(fh: Any) -> int | None:
    value = 0
    for shift in range(0, 70, 7):
        byte = fh.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    return None


def _looks_like_onnx(path: Path) -> bool:
    """True when the top-level protobuf fields are well formed for a ModelProto with a graph."""
    expected = _wire_types()
    size = path.stat().st_size
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    seen_graph = False
    with open(path, "rb") as fh:
        while fh.tell() < size:
            tag = _read_varint(fh)
            if tag is None or tag >> 3 == 0:
                return False
            field, wire = tag >> 3, tag & 7
            if field in expected and wire != expected[field]:
                return False
            if wire == 0:
                if _read_varint(fh) is None:
                    return False
            elif wire in (1, 5):
                fh.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                length = _read_varint(fh)
                if length is None:
                    return False
                fh.seek(length, os.SEEK_CUR)
                seen_graph = seen_graph or field == graph_field
            else:
                return False
            if fh.tell() > size:
                return False
    return seen_graph


# --------------------------------------------------------------------------------------------
# Loading: the one entry point


def load_model(
    path: Path,
    work_dir: Path,
    *,
    example: SampleData | None = None,
    limits: ModelLimits = ModelLimits(),  # noqa: B008 - frozen
    sandbox: SandboxLimits = SandboxLimits(),  # noqa: B008 - frozen
) -> ModelArtifact:
    """Sniff, convert (PyTorch) and validate a model; the result is ``work_dir/model.onnx``.

    Conversion and validation each run in a sandboxed child process. ONNX inputs are copied with
    their external-data files (same relative names). Nothing is left in ``work_dir`` on failure:
    files are staged in a private folder inside it and renamed into place at the end.
    """
    path = Path(path).absolute()
    work_dir = Path(work_dir).absolute()
    check_file_size(path, limits)
    fmt = sniff_format(path, limits.zip)
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".load-", dir=work_dir))
    try:
        staged = staging / MODEL_FILE
        if fmt == "onnx":
            call: Any = _stage_and_validate
            args: tuple[Any, ...] = (path, staged, limits, example)
        else:
            _isolated(convert_torch_to_onnx, path, fmt, staged, example, sandbox=sandbox, stage="conversion")
            call, args = validate_onnx, (staged, limits, example)
        files = _isolated(call, *args, sandbox=sandbox, stage="validation")
        _publish(staging, work_dir, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return describe_onnx(work_dir / MODEL_FILE, source_format=fmt)


def _stage_and_validate(source: Path, staged: Path, limits: ModelLimits, example: SampleData | None) -> list[str]:
    """Check an uploaded ONNX file where it lies, copy it and its data files, then warm the copy up."""
    files = check_onnx_static(source, limits)
    for relative in files:
        target = staged.parent / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / relative, target, follow_symlinks=False)
    shutil.copyfile(source, staged)
    warm_up(staged, example)
    return files


def _isolated(func: Any, *args: Any, sandbox: SandboxLimits, stage: str) -> Any:
    """run_isolated, with a crash reported the way a model failure is."""
    description = "validating the model" if stage == "validation" else "converting the model to ONNX"
    try:
        return run_isolated(func, *args, limits=sandbox, description=description)
    except SandboxCrashed as exc:
        if stage == "validation":
            raise InvalidModel(f"invalid ONNX model: the validator crashed ({exc.signal_name})") from exc
        raise ConversionFailed(f"the PyTorch to ONNX converter crashed ({exc.signal_name})") from exc


def _publish(staging: Path, work_dir: Path, files: Any) -> None:
    """Rename staged files into ``work_dir``, the model file last (it is what readers look for).

    ``files`` came from a child that ran untrusted code, so each is checked again like an
    external-data location: relative, inside the staging folder, no symlink, a regular file.
    """
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise SandboxError("the validator sent back a malformed file list")
    for relative in [*files, MODEL_FILE]:
        if relative != MODEL_FILE:
            safe_location(relative, staging, "(staged)")
        elif (staging / MODEL_FILE).is_symlink() or not (staging / MODEL_FILE).is_file():
            raise SandboxError("the validator left no model file")
    moved: list[Path] = []
    try:
        for relative in [*files, MODEL_FILE]:
            target = work_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target)
            moved.append(target)
    except OSError:
        for target in moved:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
