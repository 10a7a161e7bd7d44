"""Loading one model version: a verified local copy, an ONNX Runtime session, a warm-up run.

:class:`LoadedVersion` is what the registry serves; :func:`open_version` builds its parts in a
worker thread and raises :class:`LoadError` (permanent or worth retrying) with one line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from optimizer.artifact import TensorSpec
from optimizer.errors import first_line
from optimizer.runtime import RuntimeOptions, create_session
from optimizer.sandbox import is_out_of_memory
from service.errors import NotFound, ServiceError, Unavailable
from service.serving.batcher import Batcher
from service.storage.artifacts import ArtifactStore
from service.storage.catalog import FileRef

#: The file of a version that is served.
MODEL_FILE = "model.onnx"
#: ONNX Runtime tensor types we serve, as TensorSpec dtype names (``str`` for strings, as in optimizer.io).
_ORT_TYPES = {f"tensor({ort_name})": name for ort_name, name in (
    ("float", "float32"), ("double", "float64"), ("float16", "float16"), ("bool", "bool"), ("string", "str"),
    *((kind, kind) for kind in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")),
)}  # fmt: skip


@dataclass(eq=False)
class LoadedVersion:
    """One warmed-up model version: its session, interface and batcher."""

    model: str
    version: int
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batcher: Batcher
    summary: dict[str, Any] | None
    path: Path
    _names: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._names = [spec.name for spec in self.outputs]

    async def infer(self, inputs: dict[str, np.ndarray], *, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Every output for ``inputs`` (batch axis first), through the dynamic batcher.

        ``timeout_s``: this request's own limit for starting (None: the batcher's default).
        """
        return await self.batcher.submit(inputs, timeout_s=timeout_s)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One blocking session run (the batcher calls it in a thread); ONNX Runtime errors translated.

        Input that the model refuses (shape, type): ValueError. Out of memory: Unavailable.
        Anything else: ServiceError (500).
        """
        try:
            results = self.session.run(self._names, inputs)
        except Exception as exc:  # onnxruntime's own pybind exception types
            raise _run_error(exc) from exc
        return dict(zip(self._names, results, strict=True))


class LoadError(Exception):
    """A load failed; ``permanent`` when retrying the same file cannot help."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def open_version(
    ref: FileRef, *, cache_dir: Path, artifacts: ArtifactStore, runtime: RuntimeOptions
) -> tuple[Path, ort.InferenceSession, list[TensorSpec], list[TensorSpec]]:
    """Blocking (run it in a thread): the verified local copy, its session and interface, after one warm-up run."""
    path = cache_dir / f"{hashlib.sha256(ref.key.encode()).hexdigest()}.onnx"
    try:
        if not (path.is_file() and _sha256(path) == ref.sha256):
            cache_dir.mkdir(parents=True, exist_ok=True)
            artifacts.get_file(ref.key, path)
            if _sha256(path) != ref.sha256:
                path.unlink(missing_ok=True)
                raise LoadError("the model file does not match its checksum", permanent=True)
    except NotFound as exc:
        raise LoadError("the model file is missing from storage", permanent=True) from exc
    except ServiceError as exc:
        raise LoadError(exc.message, permanent=False) from exc
    except OSError as exc:
        raise LoadError(f"the model cache failed: {exc.strerror or type(exc).__name__}", permanent=False) from exc
    try:
        session = create_session(path, runtime)
    except MemoryError as exc:
        raise LoadError(f"out of memory: {first_line(exc)}", permanent=False) from exc
    except ServiceError as exc:
        raise LoadError(exc.message, permanent=False) from exc
    except Exception as exc:  # InvalidModel, InvalidConfig
        raise LoadError(first_line(exc, cache_dir), permanent=True) from exc
    inputs = [_spec(node, "input") for node in session.get_inputs()]
    outputs = [_spec(node, "output") for node in session.get_outputs()]
    try:
        session.run([spec.name for spec in outputs], _zeros(inputs))
    except Exception as exc:  # onnxruntime's own exception types
        text = first_line(exc, cache_dir)
        raise LoadError(f"the warm-up inference failed: {text}", permanent=not is_out_of_memory(exc)) from exc
    return path, session, inputs, outputs


#: Operators whose quantization scale is computed over the whole input tensor: with them, a row's
#: answer depends on the other rows of its batch, so such versions are not batched across requests.
BATCH_COUPLED_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


def rows_are_coupled(path: Path) -> bool:
    """Whether the model's graph holds an operator that mixes rows (dynamic quantization)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type in BATCH_COUPLED_OPS for node in model.graph.node)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _spec(node: Any, kind: str) -> TensorSpec:
    """A TensorSpec from ONNX Runtime's NodeArg; a type we cannot serve fails the load for good."""
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        raise LoadError(f"{kind} {node.name[:80]!r} has type {node.type[:80]}, which cannot be served", permanent=True)
    shape = tuple(d if isinstance(d, int | str) else None for d in node.shape)
    return TensorSpec(name=node.name, dtype=dtype, shape=shape)


def _zeros(inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Warm-up feed: zeros (empty strings) shaped like each input, dynamic dimensions set to 1."""
    feed: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feed[spec.name] = np.full(shape, "", dtype=object) if spec.dtype == "str" else np.zeros(shape, spec.dtype)
    return feed


def _run_error(exc: Exception) -> Exception:
    """The error a caller of :meth:`LoadedVersion.run` sees for an ONNX Runtime failure."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    text = first_line(exc)
    if is_out_of_memory(exc):
        return Unavailable("out of memory running the model; retry later")
    if isinstance(exc, InvalidArgument):
        return ValueError(text)
    return ServiceError(f"the model failed to run: {text}")
