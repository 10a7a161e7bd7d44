"""ONNX <-> PyTorch bridge for the passes that need torch modules (structured pruning, fine-tuning).

ONNX -> torch uses onnx2torch (a torch.fx ``GraphModule`` whose forward takes the graph inputs
positionally, in the ONNX graph's input order); torch -> ONNX uses torch's TorchScript-based
exporter, like :mod:`optimizer.convert`. Both directions are checked against ONNX Runtime on the
sample data. What is our own, and why:

* **torchvision shim.** onnx2torch imports torchvision at import time, only for its NMS and RoiAlign
  converters. A torchvision wheel built for another torch (e.g. a CUDA build next to CPU torch)
  fails to import ("operator torchvision::nms does not exist"). :func:`import_onnx2torch`
  then removes the half-imported ``torchvision*`` modules and imports onnx2torch against a
  placeholder whose ``torchvision.ops`` functions raise (removed again afterwards), so every other
  converter works; models using NMS/RoiAlign fail at conversion time with a clear error.
* **ORT basic optimization first.** The torch exporter emits Identity nodes for de-duplicated
  initializers, which onnx2torch cannot read. ONNX Runtime's BASIC level (constant folding,
  Identity/Dropout elimination, Conv+BN fusion; standard ops only) is run offline and its output
  converted instead.
* **Unsupported operators are found up front** with onnx2torch's own converter registry, so the
  error names the operator and opset in one line.

torch, onnx2torch and onnxruntime are imported lazily.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimizer.errors import ConversionFailed, InvalidData, PassFailed, first_line

if TYPE_CHECKING:
    import torch

_MIN_OPSET, _MAX_OPSET = 13, 20  # the TorchScript exporter's well-supported range
_VERIFY_ROWS = 16  # rows of the sample compared between torch and ONNX Runtime
_EXPORT_ROWS = 2  # rows traced by the exporter (batch 2: the batch axis is not specialised to 1)


def import_onnx2torch() -> types.ModuleType:
    """onnx2torch, imported so that a torchvision which does not load cannot break it.

    When the real torchvision fails to import (for any reason), its partially imported modules are
    dropped and a placeholder ``torchvision`` / ``torchvision.ops`` (``nms``, ``box_convert`` and
    ``roi_align`` raise RuntimeError) stands in while onnx2torch is imported, then is removed
    again: the placeholder must not linger where other libraries (transformers probes
    ``importlib.util.find_spec("torchvision")``) would find it.
    """
    loaded = sys.modules.get("onnx2torch")
    if loaded is not None:
        return loaded
    try:
        import torchvision  # noqa: F401
    except Exception:
        _drop_torchvision()
    else:
        import onnx2torch

        return onnx2torch
    sys.modules.update(_placeholder_torchvision())
    try:
        import onnx2torch
    finally:
        _drop_torchvision()
    return onnx2torch


def _drop_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _placeholder_torchvision() -> dict[str, types.ModuleType]:
    def unusable(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("torchvision is not usable here")

    package = types.ModuleType("torchvision", "placeholder: the installed torchvision does not load with this torch")
    ops = types.ModuleType("torchvision.ops", "placeholder for torchvision.ops")
    for name in ("nms", "box_convert", "roi_align"):
        setattr(ops, name, unusable)
    package.__path__ = []  # a package, so ``from torchvision.ops import x`` resolves through sys.modules
    package.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": package, "torchvision.ops": ops}


# --------------------------------------------------------------------------------------------
# ONNX -> torch


def onnx_to_torch(
    model_path: Path, sample: dict[str, np.ndarray] | None = None, *, atol: float = 1e-4
) -> torch.nn.Module:
    """Convert an ONNX model to an eval-mode torch module (a torch.fx GraphModule).

    The module's forward takes the ONNX graph inputs positionally, in graph order. With ``sample``
    (arrays named like the graph inputs), the module's outputs are compared with ONNX Runtime's on
    the original model (``rtol`` 1e-3, ``atol``). Raises ConversionFailed for an operator
    onnx2torch lacks (naming it and the opset), a failed conversion or outputs that differ.
    """
    import onnx
    import onnxruntime as ort

    onnx2torch = import_onnx2torch()

    model_path = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="slimserve-bridge-") as scratch:
        optimized = Path(scratch) / "basic.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        try:
            ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
            proto = onnx.load(str(optimized))
        except Exception as exc:
            raise ConversionFailed(f"ONNX Runtime cannot prepare the model: {first_line(exc, scratch)}") from exc
        _refuse_unsupported_ops(proto)
        try:
            module = onnx2torch.convert(proto)
        except NotImplementedError as exc:
            raise ConversionFailed(f"onnx2torch cannot convert the model: {first_line(exc, scratch)}") from exc
        except Exception as exc:
            raise ConversionFailed(f"converting the ONNX model to torch failed: {first_line(exc, scratch)}") from exc
    module.eval()
    if sample is not None:
        diff = _max_diff(module, model_path, sample, rtol=1e-3, atol=atol)
        if diff is not None:
            raise ConversionFailed(f"the torch conversion differs from ONNX Runtime by {diff:.3g} on the sample data")
    return module


def _refuse_unsupported_ops(proto: Any) -> None:
    """ConversionFailed naming the first operator onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in proto.opset_import}
    for node in proto.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx"):
            raise ConversionFailed(f"onnx2torch cannot convert {node.op_type} (domain {domain})")
        opset = opsets.get(domain, opsets.get("", 0))
        try:
            get_converter(operation_type=node.op_type, version=opset, domain="")
        except NotImplementedError as exc:
            raise ConversionFailed(f"onnx2torch cannot convert {node.op_type} (opset {opset})") from exc


# --------------------------------------------------------------------------------------------
# torch -> ONNX


def export_onnx(
    module: torch.nn.Module,
    sample: dict[str, np.ndarray],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> Path:
    """Export ``module`` to ONNX at ``path`` with the original model's input and output names.

    ``module``'s forward takes the inputs positionally in ``input_names`` order; the sample arrays
    keep their dtypes, so the candidate drops in for the original. Axis 0 of every input and
    output is dynamic ("batch"); ``opset`` is clamped to 13..20. Raises PassFailed when the export
    fails or the exported graph's inputs/outputs are not the names asked for (nothing is left at
    ``path`` then). Check the result with :func:`verify_onnx`.
    """
    import torch

    path = Path(path)
    tensors = _tensors(sample, input_names, rows=_EXPORT_ROWS)
    dynamic = {name: {0: "batch"} for name in [*input_names, *output_names]}
    module.eval()
    try:
        torch.onnx.export(
            module, tensors, str(path), input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic, opset_version=max(_MIN_OPSET, min(_MAX_OPSET, int(opset))), dynamo=False,
        )  # fmt: skip
        got_in, got_out = _io_names(path)
    except Exception as exc:
        _remove(path)
        raise PassFailed(f"exporting the torch model to ONNX failed: {first_line(exc, path.parent)}") from exc
    if got_in != list(input_names) or got_out != list(output_names):
        _remove(path)
        raise PassFailed(
            f"the exported ONNX model has inputs {', '.join(got_in)} and outputs {', '.join(got_out)}; "
            f"expected {', '.join(input_names)} and {', '.join(output_names)}"
        )
    return path


def verify_onnx(
    module: torch.nn.Module, path: Path, sample: dict[str, np.ndarray], *, rtol: float = 1e-3, atol: float = 1e-4
) -> float:
    """The largest absolute difference between ONNX Runtime on ``path`` and ``module`` on ``sample``.

    Inputs are fed to the module positionally in the ONNX model's input order. Raises PassFailed
    when an output's shape differs or any element is outside ``atol + rtol * |torch|``.
    """
    mismatch, worst = _compare(module, Path(path), sample, rtol=rtol, atol=atol)
    if mismatch is not None:
        raise PassFailed(f"the exported ONNX model differs from the torch model: {mismatch}")
    return worst


# --------------------------------------------------------------------------------------------
# helpers


def _tensors(sample: Mapping[str, np.ndarray], names: Sequence[str], rows: int) -> tuple[torch.Tensor, ...]:
    """The sample's first ``rows`` rows as tensors, in ``names`` order (InvalidData when one is missing)."""
    import torch

    missing = [n for n in names if n not in sample]
    if missing:
        raise InvalidData(f"sample data lacks the input(s) {', '.join(missing)}")
    return tuple(torch.from_numpy(np.ascontiguousarray(np.asarray(sample[n])[:rows])) for n in names)


def _leaves(outputs: Any) -> list[np.ndarray]:
    import torch
    from torch.utils import _pytree

    leaves = _pytree.tree_leaves(outputs)
    return [t.detach().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor)]


def _io_names(path: Path) -> tuple[list[str], list[str]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


def _compare(
    module: torch.nn.Module,
    path: Path,
    sample: Mapping[str, np.ndarray],
    *,
    rtol: float,
    atol: float,
) -> tuple[str | None, float]:
    """(why they differ or None, max abs diff) between ``module`` and ONNX Runtime on ``path``.

    The module takes the inputs positionally, in the ONNX model's input order.
    """
    import onnxruntime as ort
    import torch

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PassFailed(f"the ONNX model cannot be loaded: {first_line(exc, path.parent)}") from exc
    names = [i.name for i in session.get_inputs()]
    tensors = _tensors(sample, names, rows=_VERIFY_ROWS)
    feed = {n: t.numpy() for n, t in zip(names, tensors, strict=True)}
    try:
        got = session.run(None, feed)
    except Exception as exc:
        raise PassFailed(f"ONNX Runtime fails on the sample data: {first_line(exc, path.parent)}") from exc
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = _leaves(module(*tensors))
    except Exception as exc:
        raise PassFailed(f"the torch model fails on the sample data: {first_line(exc)}") from exc
    finally:
        module.train(was_training)
    if len(got) != len(want):
        return f"{len(got)} outputs against torch's {len(want)}", float("inf")
    worst = 0.0
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.shape != b.shape:
            return f"output {index} has shape {list(a.shape)}, torch's {list(b.shape)}", float("inf")
        if a.size:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else 0.0)
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            return f"max abs difference {worst:.3g} on output {index}", worst
    return None, worst


def _max_diff(
    module: torch.nn.Module,
    path: Path,
    sample: Mapping[str, np.ndarray],
    *,
    rtol: float,
    atol: float,
) -> float | None:
    """The max abs difference when module and ONNX Runtime disagree, else None."""
    try:
        mismatch, worst = _compare(module, path, sample, rtol=rtol, atol=atol)
    except PassFailed as exc:
        raise ConversionFailed(str(exc)) from exc
    return worst if mismatch is not None else None


def _remove(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + ".data")):
        with contextlib.suppress(OSError):
            leftover.unlink()
