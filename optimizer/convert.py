"""PyTorch programs to ONNX (runs only inside the sandbox child; PyTorch files are code).

TorchScript goes through ``torch.jit.load`` (whose unpickler is restricted to tensors and
TorchScript classes) and the TorchScript-based exporter; ``torch.export.load`` falls back to
unrestricted ``torch.load`` internally, so it runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``
(torch's own switch), and archives holding pickled Python objects or compiled native code are
refused beforehand. torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from optimizer.data import SampleData
from optimizer.errors import ConversionFailed, InvalidData, InvalidModel, UnsupportedModel, first_line

SourceFormat = Literal["onnx", "torchscript", "torch_export"]  # what a model file is, sniffed from its bytes

_PICKLE_ADVICE = "save PyTorch models with torch.jit.save or torch.export.save"


# --------------------------------------------------------------------------------------------
# PyTorch -> ONNX


def convert_torch_to_onnx(
    path: Path, fmt: SourceFormat, out_path: Path, example: SampleData | None = None, opset: int = 17
) -> None:
    """Convert a TorchScript (.pt) or torch.export (.pt2) program to the ONNX file ``out_path``.

    TorchScript needs ``example`` (arrays named like forward's arguments) and is exported with the
    TorchScript exporter, input names = forward's argument names, dynamic axis 0 everywhere.
    A .pt2 program is exported with the dynamo exporter, keeping the dynamic dimensions it
    declares; its own saved example inputs are used, else ``example``. The ONNX outputs are
    compared with torch's on the example (ConversionFailed when they differ). Meant to run inside
    :func:`optimizer.sandbox.run_isolated`: the file is code.
    """
    path, out_path = Path(path), Path(out_path)
    try:
        if fmt == "torchscript":
            feed, reference = _convert_torchscript(path, out_path, example, opset)
        elif fmt == "torch_export":
            feed, reference = _convert_exported(path, out_path, example, opset)
        else:
            raise ConversionFailed(f"format {fmt!r} is not a PyTorch program")
        _compare_outputs(out_path, feed, reference)
    except BaseException:
        for leftover in (out_path, out_path.with_name(out_path.name + ".data")):
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` in torch's own loaders weights-only, even where they ask otherwise."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def _convert_torchscript(
    path: Path, out_path: Path, example: SampleData | None, opset: int
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    import torch

    try:
        with _weights_only_loads():
            module = torch.jit.load(str(path), map_location="cpu")
        schema = module.forward.schema
    except Exception as exc:  # torch raises RuntimeError and friends for malformed archives
        raise InvalidModel(f"invalid TorchScript model: {first_line(exc)}") from exc
    module.eval()
    arguments = list(schema.arguments)[1:]  # drop self
    names = [a.name for a in arguments]
    for argument in arguments:
        if str(argument.type) != "Tensor":
            raise ConversionFailed(f"forward argument '{argument.name}' is {argument.type}; only tensors are supported")
    if example is None:
        raise ConversionFailed(f"converting TorchScript needs sample data with arrays named {', '.join(names)}")
    if sorted(example.inputs) != sorted(names):
        raise InvalidData(
            f"sample data arrays {', '.join(sorted(example.inputs))} do not match forward's arguments "
            f"{', '.join(names)}"
        )
    feed = example.batch(2)
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names)
    try:
        with torch.no_grad():
            reference = _tensor_leaves(module(*tensors))
    except Exception as exc:
        raise ConversionFailed(f"the TorchScript model fails on the sample data: {first_line(exc)}") from exc
    outputs = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    dynamic = {n: {0: "batch"} for n in names}
    dynamic.update({n: {0: "batch"} for n, r in zip(outputs, reference, strict=True) if r.ndim > 0})
    try:
        torch.onnx.export(
            module, tensors, str(out_path), input_names=names, output_names=outputs,
            dynamic_axes=dynamic, opset_version=opset, dynamo=False,
        )  # fmt: skip
    except Exception as exc:
        raise ConversionFailed(f"converting the TorchScript model to ONNX failed: {first_line(exc)}") from exc
    return feed, reference


def _convert_exported(
    path: Path, out_path: Path, example: SampleData | None, opset: int
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    import torch

    _refuse_unsafe_pt2(path)
    try:
        with _weights_only_loads(), open(path, "rb") as fh:  # a file object: any name will do
            program = torch.export.load(fh)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights only load failed" in str(exc).lower():
            raise InvalidModel("invalid torch.export program: it holds pickled objects that are not tensors") from exc
        raise InvalidModel(f"invalid torch.export program: {first_line(exc)}") from exc
    args, kwargs = _program_inputs(program, example)
    try:
        onnx_program = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, opset_version=opset)
        assert onnx_program is not None
        onnx_program.save(str(out_path))
        with torch.no_grad():
            reference = _tensor_leaves(program.module()(*args, **kwargs))
    except Exception as exc:
        raise ConversionFailed(f"converting the torch.export program to ONNX failed: {first_line(exc)}") from exc
    leaves = [t.numpy() for t in _torch_leaves((args, kwargs))]
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"]).get_inputs()]
    if len(names) != len(leaves):
        raise ConversionFailed(f"the ONNX model has {len(names)} inputs, the program {len(leaves)}")
    return dict(zip(names, leaves, strict=True)), reference


def _refuse_unsafe_pt2(path: Path) -> None:
    """Refuse .pt2 members that torch would unpickle freely or load as native code."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        for info in infos:
            inner = info.filename.split("/", 1)[-1]
            if inner.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                raise UnsupportedModel("torch.export archives with compiled code (AOTInductor) are not accepted")
            if inner.startswith(("data/constants/", "data/weights/")) and inner.endswith("config.json"):
                if info.file_size > 16 * 1024**2:
                    raise InvalidModel("invalid torch.export program: a payload config is too large")
                try:
                    config = json.loads(archive.read(info)).get("config", {})
                    paths = [str(entry.get("path_name", "")) for entry in config.values()]
                except (ValueError, AttributeError, UnicodeDecodeError) as exc:
                    raise InvalidModel("invalid torch.export program: a payload config is malformed") from exc
                if any(p.startswith(("custom_obj_", "opaque_obj_")) for p in paths):
                    raise UnsupportedModel("torch.export programs holding pickled Python objects are not accepted")


def _program_inputs(program: Any, example: SampleData | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The program's own saved example inputs, else ``example`` in forward's argument order."""
    import inspect

    import torch

    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        return tuple(args), dict(kwargs)
    names = list(inspect.signature(program.module().forward).parameters)
    if example is None or sorted(example.inputs) != sorted(names):
        got = "none" if example is None else ", ".join(sorted(example.inputs))
        raise InvalidData(
            f"the program saved no example inputs; sample data needs arrays {', '.join(names)}, got {got}"
        )
    feed = example.batch(2)
    return tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names), {}


def _torch_leaves(tree: Any) -> list[Any]:
    import torch
    from torch.utils import _pytree

    return [leaf for leaf in _pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _tensor_leaves(tree: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in _torch_leaves(tree)]


def _compare_outputs(model_path: Path, feed: dict[str, np.ndarray], reference: list[np.ndarray]) -> None:
    """ConversionFailed unless ONNX Runtime reproduces torch's outputs on the example."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feed)
    if len(outputs) != len(reference):
        raise ConversionFailed(f"the ONNX model has {len(outputs)} outputs, torch's {len(reference)}")
    for got, want in zip(outputs, reference, strict=True):
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4, equal_nan=True):
            raise ConversionFailed("the ONNX conversion changes the model's outputs on the sample data")
