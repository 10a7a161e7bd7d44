"""Benchmark models, built locally with no download: a BERT-class encoder and the digits CNN.

The encoder is ``transformers.BertModel`` on a ``BertConfig`` with random weights, exported with the
TorchScript exporter (``dynamo=False``) and eager attention: that graph is the one ONNX Runtime's
BERT fusion (``onnxruntime.transformers.optimizer``) recognises as a whole, giving EmbedLayerNormalization,
Attention, SkipLayerNormalization and BiasGelu. The dynamo exporter and the SDPA attention path both
export fine but leave the attention unfused (and dynamo writes the weights as external data).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]

BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BERT_OUTPUT = "last_hidden_state"
FIRST_WORD_ID = 1000  # BERT's vocabulary keeps [PAD]/[CLS]/[SEP]/[unusedN] below this


def bert_module(
    *,
    layers: int = 6,
    hidden: int = 384,
    heads: int = 12,
    intermediate: int = 1536,
    vocab: int = 30522,
    seq_len: int = 128,
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialised BertModel (no pooler) wrapped to return ``last_hidden_state`` only."""
    import torch
    from transformers import BertConfig, BertModel

    options: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        # Smaller than the vocabulary: ORT's embedding fusion tells the two tables apart by size.
        "max_position_embeddings": max(seq_len, min(512, vocab - 1)),
        "attn_implementation": "eager",  # the attention pattern ORT's fusion matches (SDPA's is not)
    }
    config = BertConfig(**options)
    torch.manual_seed(seed)
    bert = BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        """Positional (input_ids, attention_mask, token_type_ids) -> last_hidden_state."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, use_cache=False
            )
            return out.last_hidden_state

    return Encoder().eval()


def bert_inputs(n: int, seq_len: int, vocab: int = 30522, seed: int = 0) -> dict[str, np.ndarray]:
    """Random BERT feeds: int64 ``[n, seq_len]`` token ids, padding masks and two-segment type ids.

    Every sequence starts with [CLS] (101) and its real length is drawn from [seq_len/2, seq_len]; the
    rest is padding (id 0, mask 0). A second segment (type id 1) starts at a random point inside it.
    """
    rng = np.random.default_rng(seed)
    low = min(FIRST_WORD_ID, max(vocab // 2, 1))
    ids = rng.integers(low, vocab, size=(n, seq_len), dtype=np.int64)
    lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=n)
    positions = np.arange(seq_len)[None, :]
    mask = (positions < lengths[:, None]).astype(np.int64)
    second = rng.integers(1, np.maximum(lengths, 2), size=n)
    types = ((positions >= second[:, None]) & (mask == 1)).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    if vocab > 101:
        ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def bert_encoder_onnx(
    path: Path,
    *,
    layers: int = 6,
    hidden: int = 384,
    heads: int = 12,
    intermediate: int = 1536,
    vocab: int = 30522,
    seq_len: int = 128,
    seed: int = 0,
) -> Path:
    """Export a random-weight BERT encoder to ``path`` (about 90 MB with the defaults).

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``[batch, sequence]``), output
    ``last_hidden_state`` (float32 ``[batch, sequence, hidden]``); batch and sequence are dynamic.
    The example inputs are padded, so the traced graph keeps the real masking path.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = bert_module(
        layers=layers, hidden=hidden, heads=heads, intermediate=intermediate, vocab=vocab, seq_len=seq_len, seed=seed
    )
    example = bert_inputs(2, seq_len, vocab, seed)
    example["attention_mask"][0, seq_len // 2 :] = 0  # at least one padded position
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript tracer warnings about Python control flow
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(example[name]) for name in BERT_INPUTS),
            str(path),
            input_names=list(BERT_INPUTS),
            output_names=[BERT_OUTPUT],
            dynamic_axes={name: axes for name in (*BERT_INPUTS, BERT_OUTPUT)},
            dynamo=False,
            opset_version=17,
        )
    return path


def bert_sample(path: Path, n: int = 200, seq_len: int = 128, vocab: int = 30522, seed: int = 1) -> Path:
    """Write :func:`bert_inputs` as the optimizer's .npz (no labels: accuracy is fidelity to the original)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **bert_inputs(n, seq_len, vocab, seed))  # type: ignore[arg-type]
    return path


def bert_fusion_counts(path: Path, heads: int, hidden: int) -> dict[str, int]:
    """Fused-operator counts that ONNX Runtime's BERT optimizer reaches on ``path`` (nothing is written)."""
    from onnxruntime.transformers import optimizer as ort_optimizer

    fused = ort_optimizer.optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    return {name: int(count) for name, count in fused.get_fused_operator_statistics().items() if count}


def digits_cnn_onnx(out_dir: Path, *, epochs: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Train the bundled digits CNN and write ``digits_cnn.onnx`` and ``digits_sample.npz`` into ``out_dir``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples import digits_cnn

    epochs = digits_cnn.DEFAULT_EPOCHS if epochs is None else epochs
    return digits_cnn.export(Path(out_dir), epochs=epochs, seed=seed)


def mobilenet_digits(classes: int = 10) -> torch.nn.Module:
    """A MobileNet-like CNN for 32x32 digits: a stride-2 stem, five depthwise-separable blocks
    (32 -> 64 -> 128 -> 128 -> 256 -> 256 channels, BatchNorm + ReLU6), global pooling, a linear head.

    MobileNet v1's widths on a small image: the 1x1 (pointwise) convolutions hold nearly all the
    multiply-adds, which is what structured pruning removes.
    """
    from torch import nn

    def separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        ]

    widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)]
    layers: list[nn.Module] = [nn.Conv2d(1, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    for cin, cout, stride in widths:
        layers += separable(cin, cout, stride)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes)]
    return nn.Sequential(*layers)


def mobilenet_digits_onnx(out_dir: Path, *, epochs: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Train :func:`mobilenet_digits` on half of the 32x32 digits; write ``mobilenet_digits.onnx`` and the
    other half, labelled, as ``mobilenet_sample.npz`` (the sample a user would upload: enough to fine-tune on).
    """
    import torch
    import torch.nn.functional as F

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples import digits_cnn

    x, y = digits_cnn.load_digits_32(seed)
    cut = len(y) // 2
    xt, yt = torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut])
    batch_size, lr = 32, 3e-3
    with digits_cnn._training_threads():
        torch.manual_seed(seed)
        model = mobilenet_digits()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * ((cut + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(cut, generator=generator)
            for start in range(0, cut, batch_size):
                idx = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                optimizer.step()
                schedule.step()
    out_dir = Path(out_dir)
    model_path = digits_cnn.export_model(model.eval(), out_dir / "mobilenet_digits.onnx")
    sample = out_dir / "mobilenet_sample.npz"
    np.savez(sample, x=x[cut:], labels=y[cut:])
    return model_path, sample
