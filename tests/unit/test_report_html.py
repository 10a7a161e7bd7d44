"""report.html: self-contained, escaped, complete, with the accuracy/throughput plot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optimizer.report import (
    AccuracyResult,
    BatchPerformance,
    Budget,
    Candidate,
    DataSummary,
    Environment,
    LatencyStats,
    Measurement,
    ModelSummary,
    OpTiming,
    Report,
    Skipped,
)
from optimizer.report_html import budget_limit, plot_svg, render_html, write_html

EVIL = '<script>alert("x")</script>'


def _perf(batch: int, p50: float, throughput: float) -> BatchPerformance:
    stats = LatencyStats(p50=p50, p95=p50 * 1.2, p99=p50 * 1.5, mean=p50 * 1.05)
    return BatchPerformance(batch_size=batch, latency_ms=stats, throughput=throughput, iterations=50)


def _accuracy(value: float) -> AccuracyResult:
    return AccuracyResult(
        task="classification",
        metric="top1",
        value=value,
        higher_is_better=True,
        metrics={"top1": value, "top5": 0.99},
        samples=200,
    )


def _candidate(name: str, value: float, throughput: float, *, accepted: bool, pareto: bool) -> Candidate:
    perf = [_perf(1, 0.2, 5000.0), _perf(32, 32 / throughput * 1000, throughput)]
    return Candidate(
        accuracy=_accuracy(value),
        latency_ms=perf[1].latency_ms,
        throughput=throughput,
        size_bytes=400_000,
        peak_memory_bytes=12_000_000,
        performance=perf,
        bottlenecks=[],
        name=name,
        techniques=["quantize_dynamic", "graph"],
        passes=[{"pass": "quantize_dynamic", "config": {"weight_type": "int8", "note": EVIL}}],
        accuracy_drop=0.9 - value,
        speedup=throughput / 10_000.0,
        accepted=accepted,
        pareto=pareto,
        reason="within budget" if accepted else "accuracy drop over budget",
        build_seconds=1.25,
    )


def _report(**changes: object) -> Report:
    base_perf = [_perf(1, 0.3, 3300.0), _perf(32, 3.2, 10_000.0)]
    baseline = Measurement(
        accuracy=_accuracy(0.9),
        latency_ms=base_perf[1].latency_ms,
        throughput=10_000.0,
        size_bytes=1_600_000,
        peak_memory_bytes=30_000_000,
        performance=base_perf,
        bottlenecks=[
            OpTiming(node="fc1", op_type="MatMul", total_ms=4.0, calls=5, share=0.6),
            OpTiming(node="fc2", op_type="MatMul", total_ms=2.0, calls=5, share=0.3),
        ],
    )
    candidates = [
        _candidate("int8-dynamic", 0.89, 25_000.0, accepted=True, pareto=True),
        _candidate("fp16", 0.90, 12_000.0, accepted=True, pareto=True),
        _candidate(EVIL, 0.70, 30_000.0, accepted=False, pareto=True),
    ]
    fields: dict[str, object] = {
        "created_at": "2026-01-01T00:00:00Z",
        "duration_s": 42.0,
        "model": ModelSummary(
            source_format="onnx",
            inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 16]}],
            outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}],
            opset=17,
        ),
        "data": DataSummary(
            samples=256,
            duplicates_dropped=3,
            calibration_samples=56,
            validation_samples=200,
            labels="classification",
            seed=0,
        ),
        "budget": Budget(
            max_accuracy_drop=0.02, relative=False, objective="throughput", serving_batch_size=32, time_budget_s=600
        ),
        "environment": Environment(
            cpu="Test CPU",
            cores=2,
            python="3.11.9",
            onnxruntime="1.32.0",
            onnx="1.23.2",
            torch=None,
            providers=["CPUExecutionProvider"],
            device="cpu",
            slimserve="0.1.0",
        ),
        "baseline": baseline,
        "candidates": candidates,
        "skipped": [Skipped(name="prune", reason=f"not applicable {EVIL}")],
        "chosen": "int8-dynamic",
        "chosen_reason": "highest throughput within the accuracy budget",
    }
    fields.update(changes)
    return Report.model_validate(fields)


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(_report())


def test_page_names_every_model_and_section(page: str) -> None:
    for text in ("int8-dynamic", "fp16", "baseline", "highest throughput within the accuracy budget"):
        assert text in page
    assert "<title>slimserve report: int8-dynamic</title>" in page
    for section in ("Latency by batch size", "Skipped", "Slowest operators", "Environment", "Data"):
        assert section in page
    assert "Test CPU" in page and "fc1" in page and "MatMul" in page
    assert "Speedup<b>2.50×</b>" in page  # headline: the chosen one's 25000/s over the baseline's 10000/s
    assert "Size<b>-75.0%</b>" in page  # 400 kB against 1.6 MB


def test_every_string_is_escaped(page: str) -> None:
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_page_is_self_contained_with_an_inline_svg(page: str) -> None:
    assert "<svg" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert "@import" not in page and "url(http" not in page
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page  # an inline SVG, not a standalone file


def test_plot_marks_budget_front_and_chosen(page: str) -> None:
    for gid in ('id="budget"', 'id="pareto-front"', 'id="chosen"'):
        assert gid in page


def test_chosen_and_accepted_rows_are_highlighted(page: str) -> None:
    rows = re.findall(r'<tr class="([^"]*)"><td>([^<]*)</td>', page)
    classes = {name: cls.split() for cls, name in rows}
    assert "chosen" in classes["★ int8-dynamic"] and "accepted" in classes["★ int8-dynamic"]
    assert classes["fp16"] == ["accepted"]
    assert "rejected" in classes[EVIL.replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")]
    assert classes["baseline"] == ["baseline"]


def test_kept_baseline_and_no_candidates_still_renders() -> None:
    page = render_html(_report(candidates=[], skipped=[], chosen="baseline", chosen_reason="no candidate qualified"))
    assert "<h1>Chosen: baseline</h1>" in page
    assert '<tr class="baseline chosen">' in page
    assert "1.00×" in page and 'id="budget"' in page and 'id="pareto-front"' not in page


def test_budget_limit_follows_the_metric_direction() -> None:
    budget = Budget(
        max_accuracy_drop=0.02, relative=False, objective="throughput", serving_batch_size=1, time_budget_s=60
    )
    assert budget_limit(_accuracy(0.9), budget) == pytest.approx(0.88)
    mse = AccuracyResult(task="regression", metric="mse", value=0.5, higher_is_better=False, samples=10)
    assert budget_limit(mse, budget) == pytest.approx(0.52)
    relative = budget.model_copy(update={"relative": True, "max_accuracy_drop": 0.1})
    assert budget_limit(mse, relative) == pytest.approx(0.55)
    assert budget_limit(_accuracy(0.9), relative) == pytest.approx(0.81)


def test_names_with_dollar_signs_do_not_break_the_plot() -> None:
    report = _report(candidates=[_candidate("cost $5 and $", 0.89, 20_000.0, accepted=True, pareto=True)])
    report = report.model_copy(update={"chosen": "cost $5 and $"})
    svg = plot_svg(report)
    assert svg.startswith("<svg") and "cost $5 and $" in svg


def test_write_html_writes_the_rendered_page(tmp_path: Path) -> None:
    report = _report()
    target = tmp_path / "out" / "report.html"
    write_html(report, target)
    assert target.read_text(encoding="utf-8") == render_html(report)
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temp file left behind
