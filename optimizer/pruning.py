"""Structured (Torch-Pruning) and unstructured (torch.nn.utils.prune) pruning of torch modules, in place.

Structured pruning removes whole channels with Torch-Pruning's dependency graph
(``tp.pruner.BasePruner``; ``MetaPruner`` is its deprecated alias in 1.6), so the model really gets
smaller and faster. The classifier (every Linear / Conv whose output reaches a graph output
without passing another Linear / Conv) keeps its output width. Layers whose shapes are baked into
constants (e.g. a Reshape to a fixed channel count) cannot follow: the pruned module is run on the
sample afterwards and a failure raises PassFailed.

Unstructured pruning zeroes the smallest weights globally; shapes stay the same, so it shrinks the
compressed size of the model, not its latency (dense kernels multiply zeros as fast as others).

torch and torch_pruning are imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from optimizer.errors import InvalidConfig, InvalidData, PassFailed, first_line

if TYPE_CHECKING:
    import torch

Importance = Literal["magnitude", "taylor", "lamp"]
_IMPORTANCES = ("magnitude", "taylor", "lamp")


class PruneInfo(BaseModel):
    """What a pruning call did: sizes before and after, and the options it ran with.

    ``channels_*`` is the total output width of the module's Conv and Linear layers
    (Conv out_channels + Linear out_features); ``sparsity`` the fraction of zero Conv/Linear
    weights (unstructured only); ``macs_*`` per sample, None where they could not be counted;
    ``steps`` how many pruning steps reached the ratio, ``global_pruning`` whether channels were
    ranked across layers.
    """

    model_config = ConfigDict(frozen=True)

    method: Literal["structured", "unstructured"]
    ratio: float
    importance: str | None
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    channels_before: int | None
    channels_after: int | None
    sparsity: float | None
    steps: int = 1
    global_pruning: bool = False


def prune_structured(
    module: torch.nn.Module,
    sample: dict[str, np.ndarray],
    *,
    ratio: float,
    importance: Importance = "magnitude",
    round_to: int | None = 8,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    input_names: list[str],
    steps: int = 1,
    between: Callable[[int], None] | None = None,
    global_pruning: bool = False,
    max_layer_ratio: float | None = None,
) -> PruneInfo:
    """Remove ``ratio`` of the channels of every prunable layer group of ``module``, in place.

    ``module``'s forward takes ``sample``'s arrays positionally in ``input_names`` order.
    ``importance``: "magnitude" (L2 of the weights), "lamp" (layer-adaptive magnitude) or
    "taylor" (first-order Taylor; needs ``loss_fn(module) -> loss`` on a batch, whose gradients
    rank the channels). Remaining widths are multiples of ``round_to`` (None: no rounding). The
    classifier keeps its output width.

    ``steps`` > 1 prunes gradually (Torch-Pruning's ``iterative_steps``, a linear schedule): step
    ``i`` reaches ``ratio * i / steps`` with the importance scored afresh on the current weights,
    and ``between(i)`` runs after every step but the last (to train the module, which it must
    leave on the CPU). ``global_pruning`` ranks channels across layers instead of taking
    ``ratio`` from each; ``max_layer_ratio`` then caps what one layer loses. Raises InvalidConfig
    for bad options, PassFailed when nothing can be pruned or the pruned module no longer runs.
    """
    import torch

    _check_ratio(ratio, "ratio")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidConfig(f"pruning steps must be a positive integer, got {steps!r}")
    if max_layer_ratio is not None:
        _check_ratio(max_layer_ratio, "max_layer_ratio")
        if max_layer_ratio < ratio:
            raise InvalidConfig(f"max_layer_ratio ({max_layer_ratio}) must be at least the ratio ({ratio})")
    if importance not in _IMPORTANCES:
        raise InvalidConfig(f"importance must be one of {', '.join(_IMPORTANCES)}, got {importance!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise InvalidConfig(f"round_to must be a positive integer or None, got {round_to!r}")
    if importance == "taylor" and loss_fn is None:
        raise InvalidConfig("taylor importance needs a loss function to compute gradients")
    import torch_pruning as tp

    example = _example(sample, input_names)
    layers = _weighted_layers(module)
    if not layers:
        raise PassFailed("structured pruning found no Conv or Linear layers to prune")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            shapes_before = [o.shape for o in _tensor_leaves(module(*example))]
        params_before, channels_before = _param_count(module), _channels(module)
        macs_before = _macs(module, example)
        ignored = _classifier_layers(module, layers)
        scorer = {
            "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.TaylorImportance(),
            "lamp": lambda: tp.importance.LAMPImportance(p=2),
        }[importance]()
        try:
            pruner = tp.pruner.BasePruner(
                module, example, importance=scorer, pruning_ratio=ratio, ignored_layers=ignored,
                round_to=round_to, global_pruning=global_pruning, iterative_steps=steps,
                max_pruning_ratio=max_layer_ratio if max_layer_ratio is not None else 1.0,
            )  # fmt: skip
        except Exception as exc:
            raise PassFailed(f"structured pruning failed: {first_line(exc)}") from exc
        for index in range(1, steps + 1):
            _prune_step(module, pruner, loss_fn if importance == "taylor" else None)
            if between is not None and index < steps:
                between(index)
                module.eval()
        module.eval()
        try:
            with torch.no_grad():
                shapes_after = [o.shape for o in _tensor_leaves(module(*example))]
        except Exception as exc:
            raise PassFailed(f"the pruned model no longer runs: {first_line(exc)}") from exc
        if shapes_after != shapes_before:
            raise PassFailed("structured pruning changed the model's output shapes")
        return PruneInfo(
            method="structured", ratio=ratio, importance=importance,
            params_before=params_before, params_after=_param_count(module),
            macs_before=macs_before, macs_after=_macs(module, example),
            channels_before=channels_before, channels_after=_channels(module), sparsity=None,
            steps=steps, global_pruning=global_pruning,
        )  # fmt: skip
    finally:
        module.train(was_training)


def _prune_step(module: torch.nn.Module, pruner: Any, loss_fn: Callable[[Any], Any] | None) -> None:
    """One of the pruner's steps (Taylor gradients computed first); third-party errors translated."""
    import torch

    try:
        if loss_fn is not None:
            module.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(module).backward()
        pruner.step()
    except (InvalidConfig, InvalidData, PassFailed):
        raise
    except Exception as exc:
        raise PassFailed(f"structured pruning failed: {first_line(exc)}") from exc
    finally:
        module.zero_grad(set_to_none=True)


def prune_unstructured(module: torch.nn.Module, *, amount: float) -> PruneInfo:
    """Zero the ``amount`` fraction of Conv/Linear weights with the smallest magnitude, in place.

    Global L1 ranking over all Conv and Linear weights, made permanent (no masks remain). Shapes
    and parameter counts stay the same: this shrinks the compressed size, not the latency.
    Raises InvalidConfig for an amount outside (0, 1), PassFailed when there is nothing to prune.
    """
    import torch
    from torch.nn.utils import prune

    _check_ratio(amount, "amount")
    layers = _weighted_layers(module)
    if not layers:
        raise PassFailed("unstructured pruning found no Conv or Linear layers to prune")
    params = _param_count(module)
    targets = [(layer, "weight") for layer in layers]
    try:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=float(amount))
        for layer, name in targets:
            prune.remove(layer, name)
    except Exception as exc:
        raise PassFailed(f"unstructured pruning failed: {first_line(exc)}") from exc
    with torch.no_grad():
        zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
        total = sum(layer.weight.numel() for layer in layers)
    channels = _channels(module)
    return PruneInfo(
        method="unstructured", ratio=float(amount), importance=None,
        params_before=params, params_after=_param_count(module), macs_before=None, macs_after=None,
        channels_before=channels, channels_after=channels, sparsity=zeros / total if total else 0.0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# helpers


def _check_ratio(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidConfig(f"pruning {name} must be a number between 0 and 1, got {value!r}")
    if not 0 < value < 1:
        raise InvalidConfig(f"pruning {name} must be strictly between 0 and 1, got {value}")


def _example(sample: dict[str, np.ndarray], input_names: list[str]) -> tuple[torch.Tensor, ...]:
    """Two rows of the sample as tensors in ``input_names`` order (enough to trace the graph)."""
    import torch

    if not input_names:
        raise InvalidData("structured pruning needs the model's input names")
    missing = [n for n in input_names if n not in sample]
    if missing:
        raise InvalidData(f"sample data lacks the input(s) {', '.join(missing)}")
    return tuple(torch.from_numpy(np.ascontiguousarray(np.asarray(sample[n])[:2])) for n in input_names)


def _weighted_layers(module: torch.nn.Module) -> list[Any]:
    """Every Conv (any dimension, incl. transposed) and Linear layer, in module order."""
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]


def _classifier_layers(module: torch.nn.Module, layers: list[Any]) -> list[Any]:
    """Conv/Linear layers whose output reaches a graph output through weightless ops only.

    Walks the torch.fx graph backwards from the output (tracing plain modules with
    ``torch.fx.symbolic_trace``); when the module cannot be traced, the last Conv/Linear is used.
    """
    import torch

    weighted = {id(m) for m in layers}
    try:
        graph_module = module if isinstance(module, torch.fx.GraphModule) else torch.fx.symbolic_trace(module)
    except Exception:
        return layers[-1:]
    found: list[Any] = []
    seen: set[Any] = set()
    stack = [n for n in graph_module.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            target = graph_module.get_submodule(str(node.target))
            if id(target) in weighted:
                if all(target is not f for f in found):
                    found.append(target)
                continue
        stack.extend(node.all_input_nodes)
    return found  # symbolic_trace's GraphModule shares the original's submodules


def _tensor_leaves(outputs: Any) -> list[torch.Tensor]:
    import torch
    from torch.utils import _pytree

    return [t for t in _pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _channels(module: torch.nn.Module) -> int:
    from torch import nn

    total = 0
    for layer in _weighted_layers(module):
        total += layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return int(total)


def _macs(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> int | None:
    """Multiply-accumulates for one sample (Torch-Pruning's counter), None when it cannot count."""
    import torch
    import torch_pruning as tp

    try:
        with torch.no_grad():
            macs, _params = tp.utils.count_ops_and_params(module, tuple(t[:1] for t in example))
    except Exception:
        return None
    return int(macs)
