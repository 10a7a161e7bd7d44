"""The bundled example: a small digits CNN, trained in seconds, exported to ONNX, then optimized.

Data is scikit-learn's bundled 8x8 digits (no download), upsampled to 32x32 so the convolutions do
enough work per sample for int8 quantization to pay off on ONNX Runtime at batch 32.

    python examples/digits_cnn.py OUT_DIR

trains the CNN, writes ``OUT_DIR/digits_cnn.onnx`` and ``OUT_DIR/digits_sample.npz`` (held-out
images with labels), runs ``slimserve optimize`` into ``OUT_DIR/optimized`` and prints the
before/after table and the path of ``report.html``. This is what ``make run`` calls.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]

IMAGE_SIZE = 32
CLASSES = 10
TEST_FRACTION = 0.25  # held out: the test accuracy and the exported sample come from here
DEFAULT_EPOCHS = 8
MODEL_NAME = "digits_cnn.onnx"
SAMPLE_NAME = "digits_sample.npz"


def load_digits_32(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits upsampled to 32x32: float32 ``[N, 1, 32, 32]`` in [0, 1], int64 labels.

    The order is a seeded permutation of the 1797 images, so a split by position is a random split.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # pixels are 0..16
    upsampled = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = upsampled.clamp_(0.0, 1.0).numpy().astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    return np.ascontiguousarray(x[order]), y[order]


def split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out test parts (by position; :func:`load_digits_32` already shuffled)."""
    cut = len(y) - round(len(y) * TEST_FRACTION)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def build_cnn() -> torch.nn.Module:
    """Conv(1,32,s2)-BN-ReLU, Conv(32,64)-BN-ReLU, MaxPool, Conv(64,128)-BN-ReLU, Conv(128,128)-BN-ReLU,
    Conv(128,128)-ReLU, global average pool, Linear(128,10): about 28 M multiply-adds per image.

    The first convolution has one input channel, which int8 kernels barely speed up, so it works at
    stride 2; the heavy convolutions have 64-128 channels on 8x8 maps, where int8 pays off most.
    """
    from torch import nn

    def conv(cin: int, cout: int, stride: int = 1, norm: bool = True) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1)]
        return [*layers, nn.BatchNorm2d(cout), nn.ReLU()] if norm else [*layers, nn.ReLU()]

    return nn.Sequential(
        *conv(1, 32, stride=2),
        *conv(32, 64),
        nn.MaxPool2d(2),
        *conv(64, 128),
        *conv(128, 128),
        *conv(128, 128, norm=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, CLASSES),
    )


@contextmanager
def _training_threads() -> Iterator[None]:
    """Fast, reproducible CPU training: at most 8 threads and denormals flushed, restored afterwards.

    The upsampled digits are mostly exact zeros; small gradients underflow into denormals, which make
    CPU convolution backward several times slower unless they are flushed to zero.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, 8)))
    flushing = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flushing:
            torch.set_flush_denormal(False)


def train_cnn(epochs: int = DEFAULT_EPOCHS, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> torch.nn.Module:
    """Train :func:`build_cnn` on the train split (Adam, one-cycle LR, seeded); returns it in eval mode.

    The default 8 epochs take about half a minute on 2 CPU cores and reach about 99% held-out top-1.
    """
    import torch
    import torch.nn.functional as F

    x, y = load_digits_32(seed)
    x_train, y_train, _, _ = split(x, y)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps = max(epochs, 1) * ((len(yt) + batch_size - 1) // batch_size)
    with _training_threads():
        torch.manual_seed(seed)
        model = build_cnn()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(yt), generator=generator)
            for start in range(0, len(yt), batch_size):
                idx = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class predictions of ``model`` on ``x`` (torch, eval mode, no grad)."""
    import torch

    model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(x[start : start + batch_size])).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def held_out_accuracy(model: torch.nn.Module, seed: int = 0) -> float:
    """Top-1 accuracy of ``model`` on the held-out split."""
    x, y = load_digits_32(seed)
    _, _, x_test, y_test = split(x, y)
    return float((predict(model, x_test) == y_test).mean())


def export_model(model: torch.nn.Module, path: Path) -> Path:
    """``torch.onnx.export`` (TorchScript exporter, opset 17): input ``x``, output ``logits``, dynamic batch."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # dynamo=False picks the TorchScript exporter; its deprecation notice is noise for the example.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    return path


def write_sample(path: Path, seed: int = 0, count: int | None = None) -> Path:
    """Held-out images ``x`` and ``labels`` as the optimizer's .npz (the whole test split by default)."""
    x, y = load_digits_32(seed)
    _, _, x_test, y_test = split(x, y)
    if count is not None:
        x_test, y_test = x_test[:count], y_test[:count]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x_test, labels=y_test)
    return path


def export(
    out_dir: Path, *, epochs: int = DEFAULT_EPOCHS, seed: int = 0, model: torch.nn.Module | None = None
) -> tuple[Path, Path]:
    """Train (unless ``model`` is given) and write ``digits_cnn.onnx`` and ``digits_sample.npz`` into ``out_dir``."""
    out_dir = Path(out_dir)
    model = model if model is not None else train_cnn(epochs=epochs, seed=seed)
    return export_model(model, out_dir / MODEL_NAME), write_sample(out_dir / SAMPLE_NAME, seed=seed)


def main(argv: list[str] | None = None) -> int:
    """Train, export, optimize with ``slimserve optimize`` and print the before/after table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the model, the sample and optimized/")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--time-budget", type=float, default=600.0, metavar="SECONDS")
    args = parser.parse_args(argv)

    if str(ROOT) not in sys.path:  # run as a script from a checkout: make `optimizer` importable
        sys.path.insert(0, str(ROOT))
    from optimizer import cli

    started = time.perf_counter()
    model = train_cnn(epochs=args.epochs, seed=args.seed)
    accuracy = held_out_accuracy(model, seed=args.seed)
    print(f"trained digits CNN in {time.perf_counter() - started:.1f} s: held-out top-1 {accuracy:.4f}")
    model_path, sample_path = export(args.out_dir, seed=args.seed, model=model)
    print(f"exported {model_path} and {sample_path}")
    command = [
        "optimize", str(model_path), "--data", str(sample_path), "--out", str(args.out_dir / "optimized"),
        "--max-accuracy-drop", str(args.max_accuracy_drop), "--time-budget", str(args.time_budget),
        "--seed", str(args.seed),
    ]  # fmt: skip
    print("slimserve " + " ".join(command), flush=True)
    return cli.main(command)


if __name__ == "__main__":
    raise SystemExit(main())
