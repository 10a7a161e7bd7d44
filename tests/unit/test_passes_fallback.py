"""Accuracy-aware fallback: sensitivity ranking and growing exclusions, with real ORT measurements."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.errors import InvalidConfig, PassFailed
from optimizer.passes import registry
from optimizer.passes.base import PassContext
from optimizer.passes.fallback import node_sensitivity
from optimizer.passes.quantize import StaticQuantization

WIDTH, LAYERS, BAD = 32, 6, 2
RNG = np.random.default_rng(11)
CALIBRATION = SampleData({"x": RNG.normal(size=(32, WIDTH)).astype(np.float32)})
VALIDATION = RNG.normal(size=(64, WIDTH)).astype(np.float32)


def deep_mlp(path: Path) -> Path:
    """Six MatMul/Add(/Tanh) layers; layer ``fc2`` has one outlier weight, so per-tensor int8
    quantization of it rounds its other weights to almost nothing: the node to keep float."""
    rng = np.random.default_rng(0)
    nodes, inits, previous = [], [], "x"
    for i in range(LAYERS):
        w = rng.normal(0, 1 / np.sqrt(WIDTH), (WIDTH, WIDTH)).astype(np.float32)
        if i == BAD:
            w[0, 0] = 40.0
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}"),
        ]
        previous = f"a{i}"
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Tanh", [previous], [f"t{i}"], name=f"act{i}"))
            previous = f"t{i}"
    graph = helper.make_graph(
        nodes,
        "deep_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model(tmp_path: Path) -> ModelArtifact:
    """The deep MLP with one badly quantizable layer."""
    return ModelArtifact.from_onnx_file(deep_mlp(tmp_path / "deep.onnx"))


def outputs(path: Path) -> np.ndarray:
    """The model's output on the validation inputs."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": VALIDATION})[0]


def drop_measure(reference: ModelArtifact) -> Callable[[ModelArtifact], float]:
    """Accuracy drop as 1 - mean cosine similarity to the float model's outputs."""
    expected = outputs(reference.path).astype(np.float64)

    def drop(candidate: ModelArtifact) -> float:
        got = outputs(candidate.path).astype(np.float64)
        cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        return float(1.0 - cos.mean())

    return drop


def context(tmp_path: Path, model: ModelArtifact | None = None, budget: float | None = None) -> PassContext:
    """A context whose accuracy measure (when ``model`` is given) really runs the candidates."""
    return PassContext(
        work_dir=tmp_path / "work",
        calibration=CALIBRATION,
        accuracy_drop=drop_measure(model) if model else None,
        budget=budget,
    )


def node_names(path: Path, op_type: str) -> set[str]:
    """Names of the nodes of ``op_type``."""
    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == op_type}


def test_dynamic_sensitivity_ranks_the_outlier_layer_first(model: ModelArtifact, tmp_path: Path) -> None:
    quantized = registry.build("int8_dynamic").run(model, context(tmp_path))
    ranking = node_sensitivity(model, quantized, CALIBRATION, work_dir=tmp_path / "work")
    assert {name for name, _ in ranking} == {f"fc{i}" for i in range(LAYERS)}  # only quantized nodes
    assert ranking[0][0] == "fc2" and ranking[0][1] > 2 * ranking[1][1]
    assert all(score >= 0 for _, score in ranking)
    assert [p.name for p in (tmp_path / "work").iterdir()] == [quantized.path.name]


def test_qdq_sensitivity_ranks_the_outlier_layer_first(model: ModelArtifact, tmp_path: Path) -> None:
    static = registry.build("int8_static", {"per_channel": False})
    assert isinstance(static, StaticQuantization)
    ctx = context(tmp_path)
    with static.prepared(model, ctx) as prepared:  # the pre-processed float model the QDQ model came from
        quantized = static.quantize(prepared, ctx)
        ranking = node_sensitivity(prepared.model, quantized, CALIBRATION, work_dir=tmp_path / "work")
    names = [name for name, _ in ranking]
    assert names[0].startswith("fc2") and ranking[0][1] > 2 * ranking[1][1]
    assert len(names) == LAYERS and not any(name.startswith("act") for name in names)  # Tanh is not quantized


def test_generous_budget_returns_the_base_candidate_unchanged(model: ModelArtifact, tmp_path: Path) -> None:
    ctx = context(tmp_path, model, budget=1.0)
    out = registry.build("int8_fallback", {"base": "int8_dynamic"}).run(model, ctx)
    assert ctx.details["trials"] == [{"excluded": 0, "accuracy_drop": pytest.approx(drop_measure(model)(out))}]
    assert ctx.details["fallback_nodes"] == [] and ctx.details["nodes_excluded"] == []
    assert ctx.details["met_budget"] is True and "sensitivity" not in ctx.details
    plain = registry.build("int8_dynamic").run(model, context(tmp_path / "plain"))
    np.testing.assert_array_equal(outputs(out.path), outputs(plain.path))
    assert node_names(out.path, "MatMulInteger") == node_names(plain.path, "MatMulInteger")


@pytest.mark.parametrize(("base", "config"), [("int8_dynamic", {}), ("int8_static", {"per_channel": False})])
def test_tight_budget_keeps_the_worst_node_float(
    model: ModelArtifact, tmp_path: Path, base: str, config: dict[str, object]
) -> None:
    measure = drop_measure(model)
    base_drop = measure(registry.build(base, config).run(model, context(tmp_path / "base")))
    budget = base_drop / 10
    ctx = context(tmp_path, model, budget=budget)
    out = registry.build("int8_fallback", {"base": base, "base_config": config}).run(model, ctx)
    trials = ctx.details["trials"]
    assert trials[0] == {"excluded": 0, "accuracy_drop": pytest.approx(base_drop)}
    assert len(trials) >= 2 and trials[-1]["accuracy_drop"] < trials[0]["accuracy_drop"]
    assert ctx.details["met_budget"] is True and measure(out) <= budget
    (kept,) = ctx.details["fallback_nodes"]
    assert kept.startswith("fc2")
    graph = onnx.load(str(out.path)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    kept_node = next(n for n in graph.node if n.name == kept)
    assert kept_node.op_type in ("MatMul", "Gemm") and kept_node.input[1] == "w2"  # float weight
    assert kept_node.input[1] not in made_by
    assert [p.name for p in ctx.work_dir.iterdir()] == [out.path.name]  # losing trials removed


def test_unreachable_budget_returns_the_lowest_drop_within_limits(model: ModelArtifact, tmp_path: Path) -> None:
    ctx = context(tmp_path, model, budget=0.0)
    config = {"base": "int8_dynamic", "max_trials": 2, "max_excluded_fraction": 0.5}
    out = registry.build("int8_fallback", config).run(model, ctx)
    trials = ctx.details["trials"]
    assert [t["excluded"] for t in trials] == [0, 1, 2]
    assert ctx.details["met_budget"] is False
    best = min(trials, key=lambda t: t["accuracy_drop"])
    assert drop_measure(model)(out) == pytest.approx(best["accuracy_drop"])
    assert len(ctx.details["fallback_nodes"]) == best["excluded"]


def test_exclusions_stop_at_the_allowed_fraction(model: ModelArtifact, tmp_path: Path) -> None:
    ctx = context(tmp_path, model, budget=0.0)
    config = {"base": "int8_dynamic", "max_trials": 6, "max_excluded_fraction": 0.5}
    registry.build("int8_fallback", config).run(model, ctx)
    assert [t["excluded"] for t in ctx.details["trials"]] == [0, 1, 2, 3]  # 1, 2, then capped at 6 * 0.5


def test_needs_an_accuracy_measure(model: ModelArtifact, tmp_path: Path) -> None:
    with pytest.raises(PassFailed, match=r"^int8_fallback: needs an accuracy measure"):
        registry.build("int8_fallback").run(model, context(tmp_path))


@pytest.mark.parametrize(
    "config",
    [
        {"base": "int8_dynamic", "base_config": {"calibration": "minmax"}},
        {"base": "int8_static", "base_config": {"calibration": "kl"}},
        {"base": "fp16"},
        {"base": "int8_dynamic", "max_trial": 3},
        {"max_excluded_fraction": 0.0},
    ],
)
def test_registry_refuses_bad_configs(config: dict[str, object]) -> None:
    with pytest.raises(InvalidConfig, match="int8_fallback"):
        registry.build("int8_fallback", config)
