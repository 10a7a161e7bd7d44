"""The Pass protocol: one technique, one small class, one frozen pydantic config.

A pass reads a :class:`ModelArtifact` and writes a new ONNX file in ``context.work_dir``. It never
evaluates accuracy or latency itself (the pipeline does, the same way for every candidate), except
where the technique needs a signal to steer by (the accuracy-aware fallback gets
``context.accuracy_drop``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.runtime import RuntimeOptions


class PassConfig(BaseModel):
    """Base of every pass config: immutable, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides its input model.

    ``calibration`` is the calibration split (never the validation split, which is kept for
    measuring). ``accuracy_drop`` measures a candidate against the baseline on the validation
    split in the metric's units, positive meaning worse; ``budget`` is the allowed drop. A pass
    puts what the report should show about its run (excluded nodes, trials) in ``details``.
    ``original`` is the validated original (a training pass's teacher); ``deadline`` is the
    ``time.monotonic()`` by which the job's time budget runs out.
    """

    work_dir: Path
    calibration: SampleData
    device: str = "cpu"
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    seed: int = 0
    accuracy_drop: Callable[[ModelArtifact], float] | None = None
    budget: float | None = None
    log: Callable[[str], None] = lambda _message: None
    original: ModelArtifact | None = None
    deadline: float | None = None
    details: dict[str, Any] = field(default_factory=dict)  # what a pass wants in the report

    def output_path(self, stem: str) -> Path:
        """A fresh file name for a pass's output model inside the work folder."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        candidate = self.work_dir / f"{stem}.onnx"
        index = 1
        while candidate.exists():
            index += 1
            candidate = self.work_dir / f"{stem}-{index}.onnx"
        return candidate


ConfigT = TypeVar("ConfigT", bound=PassConfig)


class Pass(ABC, Generic[ConfigT]):
    """One optimization technique.

    Subclasses set ``name`` (the registry key), ``technique`` (a short tag for reports, such as
    ``int8-dynamic``) and ``config_class``, and implement :meth:`run`.
    """

    name: ClassVar[str]
    technique: ClassVar[str]
    config_class: ClassVar[type[PassConfig]]

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def skip_reason(self, model: ModelArtifact, context: PassContext) -> str | None:
        """Why this pass does not apply here (e.g. fp16 without a GPU), or None when it does."""
        return None

    @abstractmethod
    def run(self, model: ModelArtifact, context: PassContext) -> ModelArtifact:
        """Write the transformed model and describe it; raise PassFailed on failure."""
