"""ModelArtifact: the one handle that loaders, passes, evaluation and reports exchange.

After loading, every model is an ONNX file on disk; a pass reads one artifact and writes a new
file, described by a new artifact. The artifact is immutable and carries what callers need to
know without opening the file again: the input/output spec and the size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

Dim = int | str | None  # a fixed size, a named dynamic dimension, or an unnamed dynamic one


class TensorSpec(BaseModel):
    """Name, numpy dtype name (``float32``, ``int64``, ``str`` for ONNX strings) and shape."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def batch_dynamic(self) -> bool:
        """True when the first axis is dynamic, so samples can be stacked into batches."""
        return bool(self.shape) and not isinstance(self.shape[0], int)


class ModelArtifact(BaseModel):
    """An ONNX model on disk and its interface."""

    model_config = ConfigDict(frozen=True)

    path: Path
    format: Literal["onnx"] = "onnx"
    source_format: Literal["onnx", "torchscript", "torch_export"] = "onnx"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    size_bytes: int

    def input(self, name: str) -> TensorSpec:
        """The input called ``name`` (KeyError when absent)."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @classmethod
    def from_onnx_file(cls, path: Path, source_format: str = "onnx") -> ModelArtifact:
        """Describe an ONNX file that is already known to be valid (e.g. a pass's output)."""
        from optimizer.io import describe_onnx  # local: io imports this module

        return describe_onnx(path, source_format=source_format)
