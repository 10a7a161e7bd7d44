"""The pass registry: the allow-list of techniques a user or a job config may name.

Passes register with ``@register``; :func:`build` turns ``(name, config dict)`` into a configured
pass, refusing unknown names and unknown config keys.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from optimizer.errors import InvalidConfig
from optimizer.passes.base import Pass

_PASSES: dict[str, type[Pass[Any]]] = {}

# Modules whose import registers passes; imported lazily so nothing heavy runs at import time.
_PASS_MODULES = (
    "optimizer.passes.graph",
    "optimizer.passes.quantize",
    "optimizer.passes.fp16",
    "optimizer.passes.fallback",
    "optimizer.passes.prune",
)


def register(cls: type[Pass[Any]]) -> type[Pass[Any]]:
    """Class decorator adding a pass under ``cls.name``."""
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise RuntimeError(f"two passes registered as {cls.name!r}")
    _PASSES[cls.name] = cls
    return cls


def _load() -> None:
    for module in _PASS_MODULES:
        importlib.import_module(module)


def names() -> list[str]:
    """Every registered pass name."""
    _load()
    return sorted(_PASSES)


def get(name: str) -> type[Pass[Any]]:
    """The pass class registered as ``name``."""
    _load()
    try:
        return _PASSES[name]
    except KeyError:
        raise InvalidConfig(f"unknown pass {name!r}; known: {', '.join(sorted(_PASSES))}") from None


def build(name: str, config: dict[str, Any] | None = None) -> Pass[Any]:
    """A configured pass; unknown names or config keys raise InvalidConfig."""
    cls = get(name)
    try:
        parsed = cls.config_class.model_validate(config or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidConfig(f"pass {name!r}: {where}: {first['msg']}") from exc
    return cls(parsed)


def describe(instance: Pass[Any]) -> dict[str, Any]:
    """``{"pass": name, "config": {...}}``, the form reports and job configs store."""
    return {"pass": instance.name, "config": instance.config.model_dump(mode="json")}
