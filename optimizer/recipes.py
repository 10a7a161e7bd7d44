"""Candidate recipes: which chains of passes the pipeline tries, in which order.

A recipe is a named sequence of ``(pass name, config)`` steps. The default list covers graph
optimization, dynamic int8 (per-tensor, per-channel, per-channel with reduced range), static int8
QDQ with three calibration methods, fp16 on CUDA, and structured pruning at 30/50/70% (gradual:
in steps with short fine-tuning between them) with fine-tuning, with and without static int8
after it. Quantized recipes that miss the accuracy budget get an accuracy-aware fallback variant
(:func:`fallback_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optimizer.errors import InvalidConfig

Step = tuple[str, dict[str, Any]]

# Fuse first (transformer fusions where they apply) at the portable "basic" level, then quantize:
# ONNX Runtime's quantizer understands the fused Attention / SkipLayerNormalization ops.
_PREPARE: Step = ("graph", {"level": "basic"})


@dataclass(frozen=True)
class Recipe:
    """A named chain of passes producing one candidate."""

    name: str
    steps: tuple[Step, ...]
    quantized: bool = False  # eligible for the accuracy-aware fallback

    @property
    def techniques(self) -> list[str]:
        """Pass names in order (the registry maps them to report tags)."""
        return [name for name, _ in self.steps]


def default_recipes(device: str, vnni: bool = True, finetune_search: str = "none") -> list[Recipe]:
    """Every recipe in the order the pipeline tries them (cheap and likely winners first).

    ``vnni=False`` (an x86 CPU without 8-bit dot-product instructions) gives static quantization
    7-bit weights: ONNX Runtime's u8s8 kernels can saturate there and lose accuracy.
    """
    static = {"reduce_range": True} if device == "cpu" and not vnni else {}
    recipes = [
        Recipe("graph", (("graph", {"level": "extended"}),)),
        Recipe("int8-dynamic", (_PREPARE, ("int8_dynamic", {})), quantized=True),
        Recipe("int8-dynamic-per-channel", (_PREPARE, ("int8_dynamic", {"per_channel": True})), quantized=True),
        Recipe("int8-static-minmax", (("int8_static", {"calibration": "minmax", **static}),), quantized=True),
        Recipe(
            "int8-dynamic-per-channel-reduce-range",
            (_PREPARE, ("int8_dynamic", {"per_channel": True, "reduce_range": True})),
            quantized=True,
        ),
        Recipe("int8-static-percentile", (("int8_static", {"calibration": "percentile", **static}),), quantized=True),
        Recipe("int8-static-entropy", (("int8_static", {"calibration": "entropy", **static}),), quantized=True),
    ]
    if device == "cuda":
        recipes.insert(1, Recipe("fp16", (("graph", {"level": "basic"}), ("fp16", {}))))
    # Structured pruning, fine-tuned, then (the likely winner) static int8 on top. The pruned and
    # the fine-tuned models are shared steps: each is built once for its two candidates.
    for percent in PRUNE_PERCENTS:
        tuned: tuple[Step, ...] = (_gradual_prune(percent), _finetune(finetune_search))
        recipes.append(Recipe(f"prune-{percent}+ft", tuned))
        int8: Step = ("int8_static", {"calibration": "minmax", **static})
        recipes.append(Recipe(f"prune-{percent}+ft+int8", (*tuned, int8), quantized=True))
    return recipes


#: Structured pruning ratios (percent of each prunable layer's channels) in the default recipes.
#: 60 sits between 50 and 70 because on the MobileNet-like benchmark CNN it is where the accuracy
#: budget of one point still holds (+0.2-0.7 points in four runs) at 4.0-4.7x, where 50 gave
#: 2.3-3.0x and 70 lost 1.8-3.1 points (bench/notes/pruning.md).
PRUNE_PERCENTS = (30, 50, 60, 70)
#: Gradual pruning: about 10% of the channels per step, at most this many steps (time), with
#: this many epochs of fine-tuning (labels + distillation) between two steps.
MAX_PRUNE_STEPS = 5
STEP_EPOCHS = 3


def _gradual_prune(percent: int) -> Step:
    """Structured pruning to ``percent`` in steps of about 10 points with fine-tuning between them:
    on the MobileNet-like digits CNN, 50% in 5 steps ended at 0.987-0.991 top-1 after the final
    fine-tuning against 0.978 pruned at once (bench/RESULTS.md)."""
    steps = min(MAX_PRUNE_STEPS, max(1, round(percent / 10)))
    return ("prune", {"ratio": percent / 100, "steps": steps, "step_epochs": STEP_EPOCHS})


def _finetune(search: str) -> Step:
    """Fine-tuning after pruning: a pruned network recovers slowly at first, so early stopping waits
    8 epochs without improvement (the fine-tuning default, Keras's, is 3); ``search`` (none, grid,
    random) tries learning rates and batch sizes."""
    config: dict[str, Any] = {"patience": 8}
    if search != "none":
        config["search"] = search
    return ("finetune", config)


def optional_recipes(finetune_search: str = "none") -> list[Recipe]:
    """Recipes tried only when named: pruning without fine-tuning (what fine-tuning wins back) and
    unstructured pruning (smaller when compressed, not faster)."""
    bare = [Recipe(f"prune-{percent}", (("prune", {"ratio": percent / 100}),)) for percent in PRUNE_PERCENTS]
    unstructured = [
        Recipe(
            f"prune-unstructured-{percent}+ft",
            (("prune", {"ratio": percent / 100, "method": "unstructured"}), _finetune(finetune_search)),
        )
        for percent in (50, 80)
    ]
    return bare + unstructured


def select_recipes(
    device: str, names: tuple[str, ...] | None, vnni: bool = True, finetune_search: str = "none"
) -> list[Recipe]:
    """The default recipes, or the named subset in the given order; unknown names are refused."""
    defaults = default_recipes(device, vnni, finetune_search)
    if names is None:
        return defaults
    available = {recipe.name: recipe for recipe in [*defaults, *optional_recipes(finetune_search)]}
    unknown = [name for name in names if name not in available and name != "fp16"]
    if unknown:
        raise InvalidConfig(f"unknown technique {unknown[0]!r}; known: {', '.join(available)}")
    return [available[name] for name in names if name in available]


def fallback_for(recipe: Recipe, max_trials: int) -> Recipe:
    """The accuracy-aware fallback variant of a quantized recipe: same chain, last step wrapped."""
    if not recipe.quantized:
        raise ValueError(f"recipe {recipe.name!r} is not quantized")
    *prefix, (base, base_config) = recipe.steps
    wrapped: Step = ("int8_fallback", {"base": base, "base_config": base_config, "max_trials": max_trials})
    return Recipe(f"{recipe.name}+fallback", (*prefix, wrapped), quantized=False)
