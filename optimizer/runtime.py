"""The one ONNX Runtime session factory, shared by evaluation and (later) serving.

Providers are chosen TensorRT > CUDA > CPU among those this onnxruntime build offers, filtered by
the requested device. Thread counts come from :class:`RuntimeOptions` so a caller (the CLI, the
service settings) decides them once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from optimizer.errors import InvalidConfig, InvalidModel, first_line
from optimizer.sandbox import is_out_of_memory

Device = Literal["auto", "cpu", "cuda"]

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class RuntimeOptions(BaseModel):
    """How sessions are built. Zero threads means ONNX Runtime's default (one per physical core)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Device = "auto"
    intra_op_threads: int = Field(default=0, ge=0)
    inter_op_threads: int = Field(default=0, ge=0)
    use_tensorrt: bool = False
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers() -> list[str]:
    """Providers this onnxruntime build offers."""
    return list(ort.get_available_providers())


def cuda_available() -> bool:
    """True when ONNX Runtime can run on a CUDA GPU here."""
    return "CUDAExecutionProvider" in available_providers()


def cpu_has_vnni() -> bool:
    """True when the CPU has 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX).

    Without them ONNX Runtime's u8s8 int8 kernels can saturate (x86 AVX2 ``vpmaddubsw``), which
    is why static quantization then uses 7-bit weights (``reduce_range``).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    """``auto`` becomes ``cuda`` when the CUDA provider is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise InvalidConfig("device 'cuda' requested but this onnxruntime build has no CUDA provider")
    return device


def select_providers(options: RuntimeOptions) -> list[str]:
    """Providers in priority order for the options' device; CPU always last as the fallback."""
    device = resolve_device(options.device)
    chosen: list[str] = []
    if device == "cuda":
        offered = available_providers()
        for name in _GPU_PROVIDERS:
            if name == "TensorrtExecutionProvider" and not options.use_tensorrt:
                continue
            if name in offered:
                chosen.append(name)
    chosen.append("CPUExecutionProvider")
    return chosen


def session_options(options: RuntimeOptions, **overrides: Any) -> ort.SessionOptions:
    """SessionOptions from RuntimeOptions; keyword overrides set SessionOptions attributes."""
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS[options.graph_optimization_level]
    if options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    if options.inter_op_threads:
        so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    for key, value in overrides.items():
        setattr(so, key, value)
    return so


def create_session(
    model: Path | bytes, options: RuntimeOptions | None = None, **overrides: Any
) -> ort.InferenceSession:
    """An InferenceSession on the best providers; ONNX Runtime failures become InvalidModel."""
    options = options or RuntimeOptions()
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(
            source, sess_options=session_options(options, **overrides), providers=select_providers(options)
        )
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        if is_out_of_memory(exc):  # a resource failure, not a bad model
            raise MemoryError(first_line(exc)) from exc
        raise InvalidModel(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc
