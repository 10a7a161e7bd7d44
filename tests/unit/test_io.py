"""optimizer.io: sniffing, static ONNX checks, sandboxed validation and PyTorch conversion.

Real files, real ONNX Runtime, real child processes. Hostile inputs carry a canary: a pickle whose
``__reduce__`` would create a file; the file must never appear.
"""

from __future__ import annotations

import io as stdio
import json
import os
import pickle
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optimizer import io
from optimizer.data import SampleData
from optimizer.errors import ConversionFailed, InvalidData, InvalidModel, UnsupportedModel
from optimizer.io import ModelLimits, check_onnx_static, load_model, sniff_format
from optimizer.sandbox import SandboxLimits
from tests import builders


class Canary:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def segfault() -> None:
    """Run in a sandbox child to stand for a validator that crashes inside ONNX Runtime."""
    os.kill(os.getpid(), signal.SIGSEGV)


def _assert_clean(work_dir: Path) -> None:
    assert not work_dir.exists() or list(work_dir.iterdir()) == []


def _graph_model(path: Path, nodes: list[onnx.NodeProto], inputs: list[Any], outputs: list[Any], **kwargs: Any) -> Path:
    opsets = kwargs.pop("opsets", None) or [helper.make_opsetid("", 17)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, **kwargs)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _external_model(folder: Path, location: str = "data/w.bin") -> Path:
    """The MLP with every initializer in one external file at ``location`` (relative)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(builders.mlp_onnx(folder / "source.onnx")))
    (folder / "source.onnx").unlink()
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(folder / "upload.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return folder / "upload.onnx"


def _edit_external(path: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    """Rewrite the first initializer's external-data entries with ``edit``."""
    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    entries = {e.key: e.value for e in tensor.external_data}
    edit(entries)
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


MLP_FEED = {"x": np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)}


# ---- sniffing --------------------------------------------------------------------------------


def test_sniff_reads_bytes_not_names(mlp_model: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "weights.pt"
    renamed.write_bytes(mlp_model.read_bytes())
    assert sniff_format(renamed) == "onnx"
    text = tmp_path / "model.onnx"
    text.write_text("import torch\nprint('hello')\n")
    with pytest.raises(UnsupportedModel, match="not a recognised model format"):
        sniff_format(text)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedModel, match="empty"):
        sniff_format(empty)


def test_plain_pickle_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt"
    model.write_bytes(pickle.dumps(Canary(canary), protocol=2))
    with pytest.raises(UnsupportedModel, match=r"torch\.jit\.save or torch\.export\.save"):
        load_model(model, tmp_path / "work")
    assert not canary.exists()
    _assert_clean(tmp_path / "work")


def test_zip_checkpoint_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt"
    with zipfile.ZipFile(model, "w") as archive:  # the layout torch.save writes
        archive.writestr("archive/data.pkl", pickle.dumps(Canary(canary), protocol=2))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(UnsupportedModel, match=r"torch\.save"):
        load_model(model, tmp_path / "work")
    assert not canary.exists()


def test_zip_bomb_is_refused_from_the_directory(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    with zipfile.ZipFile(model, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/data.pkl", b"\0" * (8 * 1024**2))  # ~1000:1
        archive.writestr("m/constants.pkl", b"")
    with pytest.raises(InvalidModel, match="compression ratio"):
        sniff_format(model)


def test_other_zip_is_unsupported(tmp_path: Path) -> None:
    archive = tmp_path / "data.npz"
    np.savez(archive, x=np.zeros(3))
    with pytest.raises(UnsupportedModel, match=r"neither a TorchScript nor a torch\.export"):
        sniff_format(archive)


# ---- static ONNX checks ----------------------------------------------------------------------


def test_external_data_inside_the_folder_passes(tmp_path: Path) -> None:
    assert check_onnx_static(_external_model(tmp_path)) == ["data/w.bin"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.update(location="../escape.bin"), "leaves the model's folder"),
        (lambda e: e.update(location="data/../../escape.bin"), "leaves the model's folder"),
        (lambda e: e.update(location="/etc/passwd"), "absolute path"),
        (lambda e: e.update(offset="99999999999"), "past its file's end"),
        (lambda e: e.update(length="4096"), "past its file's end"),
        (lambda e: e.update(offset="-1"), "not a non-negative integer"),
        (lambda e: e.update(basepath="/"), "unknown external-data key 'basepath'"),
        (lambda e: e.update(location="data/missing.bin"), "missing file"),
        (lambda e: e.update(location="*/_ORT_MEM_ADDR_/*"), "invalid location"),
    ],
)
def test_external_data_that_escapes_or_lies_is_refused(
    tmp_path: Path, edit: Callable[[dict[str, str]], None], message: str
) -> None:
    (tmp_path / "escape.bin").write_bytes(b"\0" * 4096)
    model = _edit_external(_external_model(tmp_path / "upload"), edit)
    with pytest.raises(InvalidModel, match=message):
        check_onnx_static(model)


def test_external_data_through_a_symlink_is_refused(tmp_path: Path) -> None:
    model = _external_model(tmp_path / "upload", location="data/w.bin")
    outside = tmp_path / "outside"
    (tmp_path / "upload" / "data").rename(outside)
    (tmp_path / "upload" / "data").symlink_to(outside)
    with pytest.raises(InvalidModel, match="symbolic link"):
        check_onnx_static(model)


def test_unknown_operator_domain_is_refused(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = _graph_model(
        tmp_path / "evil.onnx",
        [helper.make_node("Evil", ["x"], ["y"], domain="com.evil")],
        [x],
        [y],
        opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)],
    )
    with pytest.raises(UnsupportedModel) as info:
        check_onnx_static(model)
    assert str(info.value) == "unknown operator domain 'com.evil' (custom op libraries are never loaded)"
    # onnx.checker cannot judge ops of a domain it does not know: only the domain check refuses.
    allowed = ModelLimits(allowed_domains=frozenset({"", "com.evil"}))
    assert check_onnx_static(model, allowed) == []
    with pytest.raises(InvalidModel, match="ONNX Runtime cannot load the model"):  # and ORT loads no op library
        io.validate_onnx(model, allowed)


def test_huge_declared_shape_is_refused(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2**20, 2**20])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2**20, 2**20])
    model = _graph_model(tmp_path / "huge.onnx", [helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    with pytest.raises(InvalidModel, match="declared shape of 'x' has more than 2147483648 elements"):
        check_onnx_static(model)
    check_onnx_static(model, ModelLimits(max_elements=2**41))  # the limit is what refuses it


def test_huge_initializer_is_refused_before_allocation(tmp_path: Path) -> None:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**40, 2**30])  # no data at all
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    model = _graph_model(
        tmp_path / "w.onnx", [helper.make_node("Add", ["x", "w"], ["y"])], [x], [y], initializer=[weight]
    )
    with pytest.raises(InvalidModel, match="tensor 'w' has more than"):
        check_onnx_static(model)


def test_oversized_file_is_refused(mlp_model: Path) -> None:
    with pytest.raises(InvalidModel, match="more than the limit of 100"):
        check_onnx_static(mlp_model, ModelLimits(max_file_bytes=100))


# ---- load_model: ONNX -----------------------------------------------------------------------


def test_valid_onnx_loads_into_work_dir(mlp_model: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    artifact = load_model(mlp_model, work)
    assert artifact.path == work / "model.onnx"
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx"]
    assert artifact.source_format == "onnx"
    assert [(s.name, s.shape) for s in artifact.inputs] == [("x", ("batch", 16))]
    assert artifact.path.read_bytes() == mlp_model.read_bytes()
    assert artifact.size_bytes == mlp_model.stat().st_size


def test_external_data_is_copied_with_its_relative_name(tmp_path: Path) -> None:
    source = _external_model(tmp_path / "upload", location="data/w.bin")
    work = tmp_path / "work"
    artifact = load_model(source, work)
    assert (work / "data" / "w.bin").read_bytes() == (tmp_path / "upload" / "data" / "w.bin").read_bytes()
    assert artifact.size_bytes == sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, MLP_FEED)[0], reference.run(None, MLP_FEED)[0])


def test_unknown_domain_fails_in_the_sandbox_and_leaves_nothing(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    model = _graph_model(
        tmp_path / "evil.onnx",
        [helper.make_node("Evil", ["x"], ["y"], domain="com.evil")],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)],
    )
    with pytest.raises(UnsupportedModel, match=r"unknown operator domain 'com\.evil'"):
        load_model(model, tmp_path / "work")
    _assert_clean(tmp_path / "work")


def test_truncated_onnx_is_invalid(mlp_model: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mlp_model.read_bytes()[: mlp_model.stat().st_size // 2])
    with pytest.raises(InvalidModel, match="invalid ONNX model"):
        load_model(truncated, tmp_path / "work")
    _assert_clean(tmp_path / "work")


def test_fuzzed_onnx_never_escapes_as_another_error(mlp_model: Path, tmp_path: Path) -> None:
    original = mlp_model.read_bytes()
    rng = np.random.default_rng(7)
    refused = 0
    cases = [bytes(rng.integers(0, 256, 600, dtype=np.uint8))]  # pure noise
    for flip_bits in (False, False, True, True):  # the first ~200 bytes hold the nodes, not weights
        mutated = bytearray(original)
        for position in rng.integers(2, 200, size=3):
            if flip_bits:
                mutated[position] ^= 1 << int(rng.integers(0, 8))
            else:
                mutated[position] = int(rng.integers(0, 256))
        cases.append(bytes(mutated))
    for number, data in enumerate(cases):
        fuzzed = tmp_path / f"fuzz{number}.onnx"
        fuzzed.write_bytes(data)
        work = tmp_path / f"work{number}"
        try:
            load_model(fuzzed, work, sandbox=SandboxLimits(memory_bytes=4 * 1024**3, timeout_s=60))
        except (InvalidModel, UnsupportedModel):
            refused += 1
            _assert_clean(work)
    assert refused >= 3


def test_model_failing_its_warm_up_is_invalid(tmp_path: Path) -> None:
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, 5])
    model = _graph_model(
        tmp_path / "reshape.onnx",
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 5])],
        initializer=[shape],
    )
    with pytest.raises(InvalidModel, match="model fails its warm-up inference"):
        load_model(model, tmp_path / "work")
    _assert_clean(tmp_path / "work")


def test_example_must_match_the_inputs(mlp_model: Path, tmp_path: Path) -> None:
    wrong_name = SampleData({"y": MLP_FEED["x"]})
    with pytest.raises(InvalidData, match="no array for model input x"):
        load_model(mlp_model, tmp_path / "a", example=wrong_name)
    wrong_dtype = SampleData({"x": MLP_FEED["x"].astype(np.float64)})
    with pytest.raises(InvalidData, match="'x' has dtype float64, the model expects float32"):
        load_model(mlp_model, tmp_path / "b", example=wrong_dtype)
    assert load_model(mlp_model, tmp_path / "c", example=SampleData(MLP_FEED)).path.exists()


def test_validator_crash_is_an_invalid_model() -> None:
    with pytest.raises(InvalidModel) as info:
        io._isolated(segfault, sandbox=SandboxLimits(), stage="validation")
    assert str(info.value) == "invalid ONNX model: the validator crashed (SIGSEGV)"


# ---- PyTorch ---------------------------------------------------------------------------------


def _torch_module() -> Any:
    import torch

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x)) + bias

    torch.manual_seed(0)
    return TwoInputs().eval()


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny two-input module saved as TorchScript (traced) and as torch.export .pt2."""
    import torch

    folder = tmp_path_factory.mktemp("torch")
    module = _torch_module()
    example = (torch.randn(2, 6), torch.randn(2, 3))
    torch.jit.save(torch.jit.trace(module, example), str(folder / "model.pt"))
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, example, dynamic_shapes={"x": {0: batch}, "bias": {0: batch}})
    torch.export.save(program, str(folder / "model.pt2"))
    return {"module": module, "pt": folder / "model.pt", "pt2": folder / "model.pt2"}


def _torch_reference(module: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(feed["x"]), torch.from_numpy(feed["bias"])).numpy()


TORCH_FEED = {
    "x": np.random.default_rng(5).normal(size=(5, 6)).astype(np.float32),
    "bias": np.random.default_rng(6).normal(size=(5, 3)).astype(np.float32),
}


@pytest.mark.slow
def test_torchscript_converts_and_matches_torch(torch_files: dict[str, Any], tmp_path: Path) -> None:
    renamed = tmp_path / "upload.bin"  # the name says nothing; the bytes do
    renamed.write_bytes(torch_files["pt"].read_bytes())
    artifact = load_model(renamed, tmp_path / "work", example=SampleData({k: v[:2] for k, v in TORCH_FEED.items()}))
    assert artifact.source_format == "torchscript"
    assert [s.name for s in artifact.inputs] == ["x", "bias"]
    assert all(s.batch_dynamic for s in artifact.inputs + artifact.outputs)
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    got = session.run(None, TORCH_FEED)[0]  # batch 5, not the 2 it was converted with
    np.testing.assert_allclose(got, _torch_reference(torch_files["module"], TORCH_FEED), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_export_converts_and_matches_torch(torch_files: dict[str, Any], tmp_path: Path) -> None:
    renamed = tmp_path / "model.onnx"  # a misleading name: the bytes decide
    renamed.write_bytes(torch_files["pt2"].read_bytes())
    artifact = load_model(renamed, tmp_path / "work")  # the program carries its own example inputs
    assert artifact.source_format == "torch_export"
    assert all(s.batch_dynamic for s in artifact.inputs)
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    feed = {i.name: TORCH_FEED[i.name] for i in session.get_inputs()}
    got = session.run(None, feed)[0]
    np.testing.assert_allclose(got, _torch_reference(torch_files["module"], TORCH_FEED), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchscript_needs_matching_sample_data(torch_files: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    with pytest.raises(ConversionFailed, match="arrays named x, bias"):
        io.convert_torch_to_onnx(torch_files["pt"], "torchscript", out)
    with pytest.raises(InvalidData, match="do not match forward's arguments x, bias"):
        io.convert_torch_to_onnx(torch_files["pt"], "torchscript", out, SampleData({"x": TORCH_FEED["x"]}))
    assert not out.exists()


def _rewrite_zip(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy an archive, replacing the members whose names end with a key of ``replace``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            for suffix, value in replace.items():
                if info.filename.endswith(suffix):
                    data = value
            new.writestr(info.filename, data)
    return target


def _torch_saved(obj: Any) -> bytes:
    import torch

    buffer = stdio.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.slow
def test_torchscript_with_hostile_pickle_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    model = tmp_path / "model.pt"
    with zipfile.ZipFile(model, "w") as archive:  # TorchScript's layout around a hostile data.pkl
        archive.writestr("m/data.pkl", pickle.dumps(Canary(canary), protocol=2))
        archive.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("m/code/__torch__.py", "")
        archive.writestr("m/version", "8\n")
    assert sniff_format(model) == "torchscript"
    with pytest.raises(InvalidModel, match="invalid TorchScript model"):
        io.convert_torch_to_onnx(model, "torchscript", tmp_path / "out.onnx", SampleData(MLP_FEED))
    assert not canary.exists()


@pytest.mark.slow
@pytest.mark.parametrize("member", ["data/sample_inputs/model.pt", "data/weights/weight_0"])
def test_torch_export_with_hostile_pickle_is_refused(torch_files: dict[str, Any], tmp_path: Path, member: str) -> None:
    canary = tmp_path / "canary"
    replace = {member: _torch_saved(Canary(canary))}
    if member.startswith("data/weights/"):  # mark the weight as pickled, as torch does for subclasses
        with zipfile.ZipFile(torch_files["pt2"]) as archive:
            name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
            config = json.loads(archive.read(name))
        for entry in config["config"].values():
            entry["use_pickle"] = entry["path_name"] == "weight_0"
        replace["model_weights_config.json"] = json.dumps(config).encode()
    model = _rewrite_zip(torch_files["pt2"], tmp_path / "model.pt2", replace)
    with pytest.raises(InvalidModel, match="pickled objects that are not tensors"):
        io.convert_torch_to_onnx(model, "torch_export", tmp_path / "out.onnx")
    assert not canary.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after the load


@pytest.mark.slow
def test_torch_export_with_pickled_objects_is_refused(torch_files: dict[str, Any], tmp_path: Path) -> None:
    config = {"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}}}
    model = _rewrite_zip(
        torch_files["pt2"], tmp_path / "model.pt2", {"model_constants_config.json": json.dumps(config).encode()}
    )
    with pytest.raises(UnsupportedModel, match="pickled Python objects"):
        io.convert_torch_to_onnx(model, "torch_export", tmp_path / "out.onnx")
