"""The bundled digits example and the benchmark model builders, on real torch and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from bench import models
from examples import digits_cnn


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_load_digits_32_shapes_dtypes_ranges() -> None:
    x, y = digits_cnn.load_digits_32(seed=0)
    assert x.shape == (1797, 1, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (1797,) and y.dtype == np.int64
    assert float(x.min()) == 0.0 and 0.9 < float(x.max()) <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_load_digits_32_keeps_images_and_labels_together() -> None:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits_cnn.load_digits_32(seed=3)
    order = np.random.default_rng(3).permutation(len(y))
    assert np.array_equal(y, digits.target[order])
    # Averaging each 4x4 block of the bilinear upsample gives back a blurred 8x8 original: close to
    # the image it came from, far from its neighbour in the shuffled order.
    down = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 4).numpy()[:, 0]
    original = digits.images[order] / 16.0
    error = np.abs(down - original).mean()
    assert error < 0.1 and error < 0.5 * np.abs(down - np.roll(original, 1, axis=0)).mean()
    other, _ = digits_cnn.load_digits_32(seed=4)
    assert not np.array_equal(x, other)  # the seed really shuffles


def test_split_is_disjoint_and_holds_out_a_quarter() -> None:
    x, y = digits_cnn.load_digits_32()
    x_train, y_train, x_test, y_test = digits_cnn.split(x, y)
    assert len(x_train) + len(x_test) == len(x) and len(y_train) == len(x_train)
    assert len(x_test) == round(len(x) * digits_cnn.TEST_FRACTION)
    assert np.array_equal(np.concatenate([x_train, x_test]), x)
    assert np.array_equal(y_test, y[len(y_train) :])


@pytest.fixture(scope="module")
def trained() -> Any:
    """The CNN after three epochs (about 95% held-out top-1, about 10 s on 2 cores)."""
    return digits_cnn.train_cnn(epochs=3, seed=0)


@pytest.mark.slow
def test_train_cnn_learns_and_is_reproducible(trained: Any) -> None:
    import torch

    accuracy = digits_cnn.held_out_accuracy(trained)
    assert accuracy >= 0.9, accuracy
    assert not trained.training
    again = digits_cnn.train_cnn(epochs=1, seed=0)
    twice = digits_cnn.train_cnn(epochs=1, seed=0)
    for a, b in zip(again.state_dict().values(), twice.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_export_writes_a_model_onnx_runtime_runs_like_torch(trained: Any, tmp_path: Path) -> None:
    import torch

    model_path, sample_path = digits_cnn.export(tmp_path, model=trained)
    assert model_path == tmp_path / "digits_cnn.onnx" and sample_path == tmp_path / "digits_sample.npz"

    with np.load(sample_path, allow_pickle=False) as sample:
        assert set(sample.files) == {"x", "labels"}
        x, labels = sample["x"], sample["labels"]
    assert 200 <= len(x) <= 1000 and x.shape[1:] == (1, 32, 32) and x.dtype == np.float32
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    held_out = digits_cnn.split(*digits_cnn.load_digits_32())[2]
    assert np.array_equal(x, held_out)  # never the training images

    session = _session(model_path)
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "x" and out.name == "logits"
    assert not isinstance(inp.shape[0], int)  # dynamic batch
    logits = np.concatenate([session.run(None, {"x": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
    assert session.run(None, {"x": x[:3]})[0].shape == (3, 10)
    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert (logits.argmax(1) == labels).mean() >= 0.9


def test_bert_inputs_are_padded_two_segment_token_ids() -> None:
    feeds = models.bert_inputs(50, 16, vocab=30522, seed=0)
    assert set(feeds) == set(models.BERT_INPUTS)
    for array in feeds.values():
        assert array.shape == (50, 16) and array.dtype == np.int64
    ids, mask, types = feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
    lengths = mask.sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 16 and len(set(lengths.tolist())) > 1
    assert np.array_equal(mask, (np.arange(16) < lengths[:, None]).astype(np.int64))  # padding at the end
    assert np.all(ids[mask == 0] == 0) and np.all(ids[mask == 1] > 0) and np.all(ids < 30522)
    assert np.all(ids[:, 0] == 101)
    assert np.all(types[mask == 0] == 0) and types.sum() > 0


def test_bert_sample_has_the_model_inputs_and_no_labels(tmp_path: Path) -> None:
    path = models.bert_sample(tmp_path / "bert.npz", n=12, seq_len=8, vocab=100)
    with np.load(path, allow_pickle=False) as sample:
        assert sorted(sample.files) == sorted(models.BERT_INPUTS)
        assert sample["input_ids"].shape == (12, 8) and int(sample["input_ids"].max()) < 100


@pytest.mark.slow
def test_tiny_bert_encoder_exports_runs_like_torch_and_fuses(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the BERT encoder needs transformers (the bench extra)")
    import torch

    shape = {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64, "vocab": 100, "seq_len": 8}
    path = models.bert_encoder_onnx(tmp_path / "bert.onnx", **shape)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == list(models.BERT_INPUTS)
    assert all(i.type == "tensor(int64)" for i in session.get_inputs())
    assert [o.name for o in session.get_outputs()] == [models.BERT_OUTPUT]
    assert all(not isinstance(d, int) for i in session.get_inputs() for d in i.shape)  # batch and sequence

    module = models.bert_module(**shape)
    for batch, seq in ((3, 8), (1, 5)):  # the export's own shape, then other batch and sequence sizes
        feeds = models.bert_inputs(batch, seq, vocab=100, seed=batch)
        (hidden,) = session.run(None, feeds)
        assert hidden.shape == (batch, seq, 32)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feeds[name]) for name in models.BERT_INPUTS)).numpy()
        np.testing.assert_allclose(hidden, expected, rtol=1e-4, atol=1e-4)

    padded = models.bert_inputs(2, 8, vocab=100, seed=7)
    unmasked = {**padded, "attention_mask": np.ones_like(padded["attention_mask"])}
    assert not np.allclose(session.run(None, padded)[0], session.run(None, unmasked)[0])  # the mask is live

    fused = models.bert_fusion_counts(path, heads=2, hidden=32)
    assert fused.get("Attention") == 1 and fused.get("SkipLayerNormalization") == 2, fused


def _report(speedup: float, drop: float, metric: str, chosen: bool) -> Any:
    """A small real Report (validated by its pydantic schema) with one candidate."""
    from optimizer import report as r

    latency = r.LatencyStats(p50=10.0, p95=11.0, p99=12.0, mean=10.5)

    def measured(value: float, throughput: float) -> dict[str, Any]:
        accuracy = r.AccuracyResult(
            task="fidelity" if metric == "cosine" else "classification",
            metric=metric,
            value=value,
            higher_is_better=True,
            samples=100,
        )
        perf = r.BatchPerformance(batch_size=32, latency_ms=latency, throughput=throughput, iterations=10)
        return {
            "accuracy": accuracy,
            "latency_ms": latency,
            "throughput": throughput,
            "size_bytes": 4_000_000,
            "performance": [perf],
        }

    candidate = r.Candidate(
        **measured(1.0 - drop, 100.0 * speedup),
        name="int8-x",
        techniques=["int8"],
        passes=[],
        accuracy_drop=drop,
        speedup=speedup,
        accepted=chosen,
        reason="test",
        build_seconds=1.0,
    )
    return r.Report(
        created_at="2026-01-01T00:00:00+00:00",
        duration_s=1.0,
        model=r.ModelSummary(source_format="onnx", inputs=[], outputs=[], opset=17),
        data=r.DataSummary(
            samples=100, duplicates_dropped=0, calibration_samples=30, validation_samples=70, labels="none", seed=0
        ),
        budget=r.Budget(
            max_accuracy_drop=0.01, relative=False, objective="throughput", serving_batch_size=32, time_budget_s=60
        ),
        environment=r.Environment(
            cpu="cpu",
            cores=2,
            python="3",
            onnxruntime="1",
            onnx="1",
            torch=None,
            providers=[],
            device="cpu",
            slimserve="0",
        ),
        baseline=r.Measurement(**measured(1.0, 100.0)),
        candidates=[candidate],
        chosen="int8-x" if chosen else "baseline",
        chosen_reason="test",
    )


def test_bench_reports_pass_and_miss_per_target_without_failing() -> None:
    from bench import optimizer_bench as bench

    fast = bench.bert_targets(_report(2.3, 0.004, "cosine", chosen=True), job_seconds=120.0)
    assert [t.status for t in fast] == ["PASS", "PASS", "PASS"]
    kept = bench.bert_targets(_report(2.3, 0.004, "cosine", chosen=False), job_seconds=400.0)
    assert [t.status for t in kept] == ["MISS", "PASS", "MISS"]  # the original was kept: 1.00x, cosine 1
    assert kept[0].measured == "1.00x"
    cnn = bench.cnn_targets(_report(1.7, 0.02, "top1", chosen=True), job_seconds=10.0)
    assert [t.status for t in cnn] == ["MISS", "MISS"]

    case = bench.CaseResult("bert", "BERT", 1.0, 400.0, kept, report=_report(2.3, 0.004, "cosine", chosen=False))
    machine = bench.machine_info(["bench/optimizer_bench.py", "--models", "bert"])
    text = bench.markdown(machine, [case])
    assert "| throughput >= 2.0x at batch 32 | 1.00x | MISS |" in text
    assert "| int8-x |" in text and "command: `python bench/optimizer_bench.py --models bert`" in text
    broken = bench.CaseResult("cnn", "CNN", 1.0, 2.0, [], error="invalid ONNX model")
    assert "**ERROR** after 2.0 s: invalid ONNX model" in bench.markdown(machine, [broken])
    assert bench.main(["--models", "nope"]) == 2
