"""The ``config`` part of an upload: the model's name, the optimizer's options and what to do after.

Unknown keys are refused (a typo must not silently fall back to a default). The optimizer's own
options are validated here by :class:`optimizer.pipeline.OptimizeConfig` itself, so the API and
`slimserve optimize` can never disagree about what is valid.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from optimizer.pipeline import OptimizeConfig
from optimizer.recipes import default_recipes
from service.errors import BadRequest

#: Model names: what a URL path segment, a file name and a Prometheus label can all carry safely.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Keys of the config that belong to the service, not to the optimizer.
_SERVICE_KEYS = frozenset({"name", "deploy"})


def check_name(name: str) -> str:
    """``name`` if it is a valid model name, else BadRequest (no ``..``, ``/``, NUL, look-alikes, max 64)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise BadRequest("model name must be 1-64 characters of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
    if unicodedata.normalize("NFKC", name) != name:  # unreachable with the ASCII pattern; kept as a guard
        raise BadRequest("model name must be plain ASCII")
    return name


class JobConfig(BaseModel):
    """What an upload asks for; every optimizer option has the CLI's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="model name (1-64 of A-Z a-z 0-9 _ . -)")
    deploy: bool = Field(True, description="serve the optimized version as the default once it is ready")
    task: Literal["auto", "classification", "regression", "fidelity"] = "auto"
    metric: str | None = Field(None, description="primary metric (default: the task's first: top1, mse, cosine)")
    max_accuracy_drop: float = Field(0.01, ge=0)
    relative: bool = False
    objective: Literal["throughput", "latency", "size"] = "throughput"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    time_budget_s: float = Field(900.0, gt=0, le=24 * 3600)
    serving_batch_size: int = Field(32, ge=1, le=4096)
    techniques: tuple[str, ...] | None = None
    finetune_search: Literal["none", "grid", "random"] = "none"
    fallback: bool = True
    fallback_max_trials: int = Field(6, ge=1, le=50)
    seed: int = 0
    calibration_fraction: float = Field(0.3, gt=0, lt=1)
    latency_seconds: float = Field(2.0, gt=0, le=120)
    measure_memory: bool = True

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return check_name(value)
        except BadRequest as exc:
            raise ValueError(exc.message) from None

    @field_validator("techniques")
    @classmethod
    def _known_techniques(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        known = {recipe.name for recipe in default_recipes("cuda")} | {r.name for r in default_recipes("cpu", False)}
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown technique {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if not value:
            raise ValueError("techniques must name at least one recipe (omit it for all)")
        return value

    def optimize_config(self) -> OptimizeConfig:
        """The optimizer's options (everything but the service's own keys)."""
        return OptimizeConfig(**self.model_dump(exclude=set(_SERVICE_KEYS)))

    @classmethod
    def parse(cls, raw: bytes | str | None, default_name: str | None = None) -> JobConfig:
        """Parse the upload's ``config`` part (JSON); BadRequest with the first problem."""
        try:
            data: Any = {} if raw is None or not raw.strip() else _json_object(raw)
            if default_name is not None:
                data.setdefault("name", default_name)
            config = cls.model_validate(data)
            config.optimize_config()  # the optimizer agrees
            return config
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error.get("loc", ())) or "config"
            message = error.get("msg", "invalid").removeprefix("Value error, ")
            raise BadRequest(f"config: {where}: {message}") from None


def _json_object(raw: bytes | str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("config must be a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest("config must be a JSON object")
    return value
