"""Light input augmentation for distillation: shifted, slightly noisy copies of image inputs.

With a teacher, an augmented input needs no label: its target is the teacher's output on that
very input, so the few labelled samples a user uploads become many distinct training inputs.
Only image-shaped float inputs qualify (every model input ``[N, C, H, W]`` with H and W at least
16): a shift of one or two pixels and noise of a few percent of the data's spread keep such an
image what it was, while the same change to a feature vector or a token id would not.

The copies are made once, before training (numpy, seeded), and the teacher runs on them once in
ONNX Runtime: the tensors stay prepared once and cached, DDP ranks share them, and an epoch reads
plain tensors. Why our own: torchvision's transforms work per image inside the loop (where a
per-batch teacher would then have to run in torch) and would add a dependency for two operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from optimizer.errors import InvalidConfig

if TYPE_CHECKING:
    import torch

AugmentMode = Literal["auto", "on", "off"]
MIN_SIDE = 16  # H and W at least this: smaller inputs are not treated as images
MAX_SHIFT = 2  # pixels, each direction, per sample
NOISE = 0.03  # Gaussian noise, as a fraction of the input's standard deviation


def image_shaped(inputs: dict[str, np.ndarray]) -> bool:
    """Whether every input is a float ``[N, C, H, W]`` array with H, W >= 16."""
    return bool(inputs) and all(
        a.ndim == 4 and a.dtype.kind == "f" and min(a.shape[2:]) >= MIN_SIDE for a in inputs.values()
    )


def enabled(mode: AugmentMode, inputs: dict[str, np.ndarray], distills: bool) -> bool:
    """Whether to augment: "auto" does for image-shaped inputs when a teacher gives the targets.

    "on" raises InvalidConfig where augmentation cannot apply (no teacher, or inputs that are not
    image-shaped); "off" never augments.
    """
    if mode not in ("auto", "on", "off"):
        raise InvalidConfig(f"augment must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return False
    possible = distills and image_shaped(inputs)
    if mode == "on" and not possible:
        why = "a teacher (distillation)" if not distills else "float [N, C, H, W] inputs with H and W >= 16"
        raise InvalidConfig(f"input augmentation needs {why}")
    return possible


def augmented_copy(inputs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """One augmented copy of every sample: a random shift of up to 2 pixels in H and W (edges
    repeated into the gap) and Gaussian noise of 3% of each input's standard deviation.

    A sample's inputs share its shift. Shapes and dtypes are kept.
    """
    rng = np.random.default_rng(seed)
    count = len(next(iter(inputs.values())))
    shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(count, 2))
    out: dict[str, np.ndarray] = {}
    for name, array in inputs.items():
        pad = ((0, 0), (0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT))
        padded = np.pad(array, pad, mode="edge")
        height, width = array.shape[2:]
        shifted = np.empty_like(array)
        for dy, dx in {(int(a), int(b)) for a, b in shifts}:
            rows = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            top, left = MAX_SHIFT - dy, MAX_SHIFT - dx
            shifted[rows] = padded[rows, :, top : top + height, left : left + width]
        spread = float(array.std()) * NOISE
        if spread > 0:
            shifted += rng.normal(0.0, spread, size=shifted.shape).astype(array.dtype)
        out[name] = np.ascontiguousarray(shifted)
    return out


class EpochData:
    """The training samples, then (when augmenting) one augmented copy of them, a different one
    each epoch (:meth:`set_epoch`); a map-style dataset for the DataLoader."""

    def __init__(self, train: list[torch.Tensor], views: Sequence[list[torch.Tensor]]) -> None:
        self.train = train
        self.views = views
        self.current = self.views[0] if self.views else None
        self.count = len(self.train[0])

    def set_epoch(self, epoch: int) -> None:
        """Read copy number ``(epoch - 1) % copies`` this epoch (epochs count from 1)."""
        if self.views:
            self.current = self.views[(epoch - 1) % len(self.views)]

    def __len__(self) -> int:
        return self.count * (2 if self.current is not None else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if index < self.count:
            return tuple(t[index] for t in self.train)
        assert self.current is not None
        return tuple(t[index - self.count] for t in self.current)
