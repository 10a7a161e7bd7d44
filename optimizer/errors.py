"""The optimizer's error tree.

Every refusal the optimizer makes is one of these; ``str(err)`` is a single clear line meant for a
user (no tracebacks, no temporary paths). Third-party exceptions are translated at the boundary
with ``raise ... from exc``.
"""

from __future__ import annotations

from pathlib import Path


class OptimizerError(Exception):
    """Base of every error the optimizer raises on purpose."""

    def __init__(self, message: str) -> None:
        # Keep the message to one line whatever the cause said.
        super().__init__(" ".join(str(message).split()))


class UnsupportedModel(OptimizerError):
    """The file is not a model format we accept (sniffed from its bytes), or uses what we refuse."""


class InvalidModel(OptimizerError):
    """The file claims a supported format but is malformed, unsafe or fails to run."""


class ConversionFailed(OptimizerError):
    """A PyTorch program could not be converted to ONNX."""


class InvalidData(OptimizerError):
    """The sample data is malformed or does not match the model's inputs."""


class PassFailed(OptimizerError):
    """An optimization pass could not produce a candidate (the pipeline records it and goes on)."""


class InvalidConfig(OptimizerError):
    """An optimization option or pass configuration is not valid."""


class SandboxError(OptimizerError):
    """A sandboxed child process crashed, ran out of memory or time."""


def first_line(exc: BaseException, *folders: Path | str, limit: int = 300) -> str:
    """A third-party exception's first non-empty message line (its type name when there is none).

    Each of ``folders`` (scratch or work folders) is cut out of the text, so no temporary path
    reaches a user.
    """
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    for folder in sorted({str(f) for f in folders}, key=len, reverse=True):
        text = text.replace(folder + "/", "").replace(folder, "")
    return text[:limit]
