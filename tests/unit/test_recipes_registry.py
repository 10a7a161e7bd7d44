"""Recipes and the pass registry (the allow-list of techniques)."""

from __future__ import annotations

import pytest

from optimizer import recipes
from optimizer.errors import InvalidConfig
from optimizer.passes import registry


def test_every_default_recipe_names_registered_passes_with_valid_configs() -> None:
    for recipe in recipes.default_recipes("cuda"):
        for name, config in recipe.steps:
            registry.build(name, config)  # raises on an unknown pass or config key


def test_fp16_only_offered_on_cuda() -> None:
    assert "fp16" not in {r.name for r in recipes.default_recipes("cpu")}
    assert "fp16" in {r.name for r in recipes.default_recipes("cuda")}


def test_select_keeps_the_requested_order_and_refuses_unknown_names() -> None:
    chosen = recipes.select_recipes("cpu", ("int8-static-minmax", "graph"))
    assert [r.name for r in chosen] == ["int8-static-minmax", "graph"]
    with pytest.raises(InvalidConfig, match="unknown technique 'magic'"):
        recipes.select_recipes("cpu", ("magic",))


def test_fallback_wraps_the_quantization_step() -> None:
    recipe = next(r for r in recipes.default_recipes("cpu") if r.name == "int8-dynamic-per-channel")
    wrapped = recipes.fallback_for(recipe, max_trials=3)
    assert wrapped.name == "int8-dynamic-per-channel+fallback"
    name, config = wrapped.steps[-1]
    assert name == "int8_fallback" and config["base"] == "int8_dynamic"
    assert config["base_config"] == {"per_channel": True}
    registry.build(name, config)
    with pytest.raises(ValueError):
        recipes.fallback_for(recipes.default_recipes("cpu")[0], 3)


def test_registry_refuses_unknown_pass_and_unknown_keys() -> None:
    with pytest.raises(InvalidConfig, match="unknown pass"):
        registry.build("nope")
    with pytest.raises(InvalidConfig, match="int8_dynamic"):
        registry.build("int8_dynamic", {"per_chanel": True})


def test_static_quantization_uses_7_bit_weights_on_cpus_without_vnni() -> None:
    def static_configs(vnni: bool) -> list[dict[str, object]]:
        return [c for r in recipes.default_recipes("cpu", vnni) for n, c in r.steps if n == "int8_static"]

    assert all(c.get("reduce_range") is True for c in static_configs(vnni=False))
    assert not any(c.get("reduce_range") for c in static_configs(vnni=True))


def test_pruning_recipes_share_steps_and_carry_the_search_setting() -> None:
    plain = {r.name: r for r in recipes.default_recipes("cpu")}
    for percent in recipes.PRUNE_PERCENTS:
        tuned, int8 = plain[f"prune-{percent}+ft"], plain[f"prune-{percent}+ft+int8"]
        assert int8.steps[: len(tuned.steps)] == tuned.steps  # built once, used by both candidates
        assert tuned.steps[-1] == ("finetune", {"patience": 8})
        assert int8.quantized and not tuned.quantized
    searched = recipes.select_recipes("cpu", ("prune-50+ft", "prune-unstructured-50+ft"), finetune_search="grid")
    assert [step[1].get("search") for recipe in searched for step in recipe.steps if step[0] == "finetune"] == [
        "grid",
        "grid",
    ]
    assert "prune-50" not in plain  # bare pruning is tried only when named
    assert [r.name for r in recipes.select_recipes("cpu", ("prune-50",))] == ["prune-50"]
