"""report.html: one self-contained page (inline CSS and SVG, no scripts, fonts or links) per run.

Every string from the report goes through :func:`html.escape`. The accuracy/throughput plot is
drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure``) and saved as SVG: that
needs no pyplot and no global backend, so it neither depends on nor changes the backend of the
process (the embedding recipe matplotlib documents for web servers) and is safe in threads.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optimizer.report import AccuracyResult, Budget, Candidate, Measurement, Report, atomic_write_text
from optimizer.report_training import render_training

_log = logging.getLogger(__name__)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#1d232b;padding:0 1rem}
h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.15rem;margin:2rem 0 .6rem;border-bottom:1px solid #d8dde3}
.reason{color:#46505c;margin:.2rem 0 1rem}.muted{color:#7a8591}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #d8dde3;border-radius:8px;padding:.7rem 1rem;
min-width:180px}.card b{display:block;font-size:1.5rem}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{padding:.3rem .5rem;border-bottom:1px solid #e6e9ed;
text-align:left;vertical-align:top}th{background:#f4f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.accepted{background:#eefaf0}tr.chosen{background:#d7f3dd;font-weight:600}tr.baseline{background:#f6f7f9}
.bar{background:#e4572e;height:.6rem;border-radius:2px}dl{display:grid;grid-template-columns:max-content 1fr;
gap:.2rem 1rem}dt{color:#46505c}dd{margin:0}.plot svg{max-width:100%;height:auto}
code,pre{font:12px ui-monospace,Menlo,Consolas,monospace}pre{white-space:pre-wrap;margin:.2rem 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def budget_limit(baseline: AccuracyResult, budget: Budget) -> float:
    """The worst accuracy the budget allows: baseline minus the allowed drop (plus, when lower is better).

    With a relative budget the allowed drop is ``max_accuracy_drop * |baseline|``.
    """
    allowed = budget.max_accuracy_drop * (abs(baseline.value) if budget.relative else 1.0)
    return baseline.value - allowed if baseline.higher_is_better else baseline.value + allowed


def render_html(report: Report) -> str:
    """The whole report as one HTML document (a string), viewable offline."""
    chosen = report.chosen_candidate()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>slimserve report: {_e(report.chosen)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Chosen: {_e(report.chosen)}</h1>",
        f'<p class="reason">{_e(report.chosen_reason)}</p>',
        _headline(report, chosen),
        "<h2>Candidates</h2>",
        _models_table(report),
        _pass_configs(report.candidates),
        "<h2>Accuracy against throughput</h2>",
        f'<div class="plot">{_plot_or_note(report)}</div>',
        render_training(report),
        "<h2>Latency by batch size</h2>",
        _latency_table(report),
        "<h2>Skipped</h2>",
        _skipped(report),
        "<h2>Slowest operators of the baseline</h2>",
        _bottlenecks(report.baseline),
        "<h2>Budget</h2>",
        _budget(report),
        "<h2>Data</h2>",
        _dl(report.data.model_dump().items()),
        "<h2>Model</h2>",
        _model(report),
        "<h2>Environment</h2>",
        _dl(report.environment.model_dump().items()),
        f'<p class="muted">Created {_e(report.created_at)} in {_e(_seconds(report.duration_s))}; '
        f"report schema {_e(report.schema_version)}.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(report: Report, path: Path) -> None:
    """Render ``report`` and write it to ``path`` atomically."""
    atomic_write_text(Path(path), render_html(report))


# ---- formatting ------------------------------------------------------------------------------


def _bytes(value: int | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def _ms(value: float) -> str:
    if not math.isfinite(value):
        return _e(value)
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def _num(value: float) -> str:
    return f"{value:.4g}"


def _rate(value: float) -> str:
    return f"{value:,.0f}/s" if math.isfinite(value) and value >= 100 else f"{value:.1f}/s"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _drop(value: float, budget: Budget) -> str:
    return f"{value * 100:+.2f}%" if budget.relative else f"{value:+.4g}"


def _accuracy(result: AccuracyResult) -> str:
    every = ", ".join(f"{k}={_num(v)}" for k, v in sorted(result.metrics.items()))
    return f'<span title="{_e(every)}">{_num(result.value)}</span> <span class="muted">{_e(result.metric)}</span>'


# ---- sections ----------------------------------------------------------------------------------


def _headline(report: Report, chosen: Candidate | None) -> str:
    base = report.baseline
    speedup = chosen.speedup if chosen else 1.0
    drop = chosen.accuracy_drop if chosen else 0.0
    size = chosen.size_bytes if chosen else base.size_bytes
    change = (size - base.size_bytes) / base.size_bytes * 100 if base.size_bytes else 0.0
    metric = base.accuracy.metric + (" (relative)" if report.budget.relative else "")
    cards = [
        (
            "Speedup",
            f"{speedup:.2f}×",
            f"throughput at batch {report.budget.serving_batch_size}, timed alternately with the original",
        ),
        (
            "Accuracy drop",
            _drop(drop, report.budget),
            f"{metric}; budget {_drop(report.budget.max_accuracy_drop, report.budget)}",
        ),
        ("Size", f"{change:+.1f}%", f"{_bytes(base.size_bytes)} → {_bytes(size)}"),
    ]
    body = "".join(
        f'<div class="card">{_e(t)}<b>{_e(v)}</b><span class="muted">{_e(n)}</span></div>' for t, v, n in cards
    )
    return f'<div class="cards">{body}</div>'


def _row(cells: Iterable[tuple[str, bool]], cls: str = "") -> str:
    tds = "".join(f'<td class="n">{c}</td>' if numeric else f"<td>{c}</td>" for c, numeric in cells)
    return f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>"


def _head(*names: str) -> str:
    return "<tr>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"


def _models_table(report: Report) -> str:
    base = report.baseline
    rows = [
        _head(
            "model",
            "techniques",
            "accuracy",
            "drop",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "throughput",
            "speedup",
            "size",
            "peak memory",
            "accepted",
            "pareto",
            "reason",
        )
    ]
    classes = "baseline chosen" if report.chosen == "baseline" else "baseline"
    rows.append(
        _row(
            [
                *_measured_cells("baseline", "—", base, "—", 1.0),
                ("—", False),
                ("—", False),
                ("original model", False),
            ],
            classes,
        )
    )
    for cand in report.candidates:
        cls = " ".join(
            c
            for c, on in (
                ("accepted", cand.accepted),
                ("rejected", not cand.accepted),
                ("chosen", cand.name == report.chosen),
            )
            if on
        )
        name = ("★ " if cand.name == report.chosen else "") + cand.name
        cells = _measured_cells(
            name, ", ".join(cand.techniques) or "—", cand, _drop(cand.accuracy_drop, report.budget), cand.speedup
        )
        cells += [
            ("yes" if cand.accepted else "no", False),
            ("yes" if cand.pareto else "no", False),
            (_e(cand.reason), False),
        ]
        rows.append(_row(cells, cls))
    return "<table>" + "".join(rows) + "</table>"


def _measured_cells(name: str, techniques: str, m: Measurement, drop: str, speedup: float) -> list[tuple[str, bool]]:
    text = [(_e(name), False), (_e(techniques), False), (_accuracy(m.accuracy), True), (_e(drop), True)]
    numbers = [_ms(m.latency_ms.p50), _ms(m.latency_ms.p95), _ms(m.latency_ms.p99), _e(_rate(m.throughput))]
    numbers += [f"{speedup:.2f}×", _e(_bytes(m.size_bytes)), _e(_bytes(m.peak_memory_bytes))]
    return text + [(n, True) for n in numbers]


def _pass_configs(candidates: list[Candidate]) -> str:
    if not candidates:
        return '<p class="muted">No candidate was produced.</p>'
    items = "".join(
        f"<p><b>{_e(c.name)}</b> built in {_e(_seconds(c.build_seconds))}</p>"
        f"<pre>{_e(json.dumps(c.passes, indent=1, sort_keys=True, default=str))}</pre>"
        for c in candidates
    )
    return f"<details><summary>Pass configurations</summary>{items}</details>"


def _latency_table(report: Report) -> str:
    rows = [_head("model", "batch", "p50 ms", "p95 ms", "p99 ms", "mean ms", "throughput", "iterations")]
    models: list[tuple[str, Measurement]] = [("baseline", report.baseline)]
    models += [(c.name, c) for c in report.candidates]
    for name, m in models:
        for perf in m.performance:
            lat = perf.latency_ms
            numbers = [_e(perf.batch_size), _ms(lat.p50), _ms(lat.p95), _ms(lat.p99), _ms(lat.mean)]
            numbers += [_e(_rate(perf.throughput)), _e(perf.iterations)]
            rows.append(_row([(_e(name), False), *((n, True) for n in numbers)]))
    return "<table>" + "".join(rows) + "</table>"


def _skipped(report: Report) -> str:
    if not report.skipped:
        return '<p class="muted">None.</p>'
    return "<ul>" + "".join(f"<li><b>{_e(s.name)}</b>: {_e(s.reason)}</li>" for s in report.skipped) + "</ul>"


def _bottlenecks(base: Measurement) -> str:
    if not base.bottlenecks:
        return '<p class="muted">Not profiled.</p>'
    rows = [_head("node", "operator", "total ms", "calls", "share", "")]
    for op in base.bottlenecks:
        width = max(0.0, min(op.share, 1.0)) * 100
        bar = f'<div class="bar" style="width:{width:.1f}%"></div>'
        cells = [(_e(op.node), False), (_e(op.op_type), False), (_ms(op.total_ms), True)]
        cells += [(_e(op.calls), True), (f"{op.share * 100:.1f}%", True), (bar, False)]
        rows.append(_row(cells))
    return "<table>" + "".join(rows) + "</table>"


def _budget(report: Report) -> str:
    budget = report.budget
    limit = budget_limit(report.baseline.accuracy, budget)
    sign = "≥" if report.baseline.accuracy.higher_is_better else "≤"
    items = [
        ("max accuracy drop", _drop(budget.max_accuracy_drop, budget).lstrip("+")),
        ("accepted when", f"{report.baseline.accuracy.metric} {sign} {_num(limit)}"),
        ("objective", budget.objective),
        ("serving batch size", budget.serving_batch_size),
        ("time budget", _seconds(budget.time_budget_s)),
    ]
    return _dl(items)


def _model(report: Report) -> str:
    model = report.model

    def tensors(specs: list[dict[str, Any]]) -> str:
        return ", ".join(
            f"{s.get('name', '?')}: {s.get('dtype', '?')} [{', '.join(map(str, s.get('shape') or []))}]"
            if "name" in s
            else json.dumps(s, default=str)
            for s in specs
        )

    items = [("source format", model.source_format), ("opset", model.opset)]
    return _dl([*items, ("inputs", tensors(model.inputs)), ("outputs", tensors(model.outputs))])


def _dl(items: Iterable[tuple[str, Any]]) -> str:
    def text(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value))
        return "—" if value is None else str(value)

    body = "".join(f"<dt>{_e(k.replace('_', ' '))}</dt><dd>{_e(text(v))}</dd>" for k, v in items)
    return f"<dl>{body}</dl>"


# ---- plot ----------------------------------------------------------------------------------------


def _plot_or_note(report: Report) -> str:
    try:
        return plot_svg(report)
    except Exception as exc:  # a broken plot must not cost the user the rest of the report
        _log.warning("accuracy/throughput plot failed: %s", exc)
        return '<p class="muted">The plot could not be drawn.</p>'


def plot_svg(report: Report) -> str:
    """Accuracy (y) against throughput (x) as an inline ``<svg>`` element.

    Shows the baseline, accepted and rejected candidates, the Pareto front (``id="pareto-front"``),
    the chosen model (``id="chosen"``) and the budget line (``id="budget"``).
    """
    import matplotlib
    from matplotlib.figure import Figure

    base = report.baseline
    acc = base.accuracy
    finite = [c for c in report.candidates if math.isfinite(c.throughput) and math.isfinite(c.accuracy.value)]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "slimserve", "font.size": 9}):
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.add_subplot()
        ax.scatter([base.throughput], [acc.value], marker="s", s=64, color="#4a5563", label="baseline", zorder=4)
        for accepted, color, marker, label in ((True, "#2a9d4b", "o", "accepted"), (False, "#b0b7bf", "X", "rejected")):
            group = [c for c in finite if c.accepted == accepted]
            if group:
                xs, ys = [c.throughput for c in group], [c.accuracy.value for c in group]
                ax.scatter(xs, ys, s=44, color=color, marker=marker, label=label, zorder=3)
        front = sorted((c for c in finite if c.pareto), key=lambda c: c.throughput)
        if front:
            xs, ys = [c.throughput for c in front], [c.accuracy.value for c in front]
            ax.plot(xs, ys, "-", color="#2a9d4b", alpha=0.6, lw=1.5, label="Pareto front", gid="pareto-front")
        chosen = report.chosen_candidate()
        point = (base.throughput, acc.value) if chosen is None else (chosen.throughput, chosen.accuracy.value)
        if all(math.isfinite(v) for v in point):
            label = f"chosen: {_short(report.chosen)}"
            ax.scatter(
                [point[0]],
                [point[1]],
                s=260,
                facecolors="none",
                edgecolors="#e4572e",
                linewidths=2,
                zorder=5,
                label=label,
                gid="chosen",
            )
        limit = budget_limit(acc, report.budget)
        if math.isfinite(limit):
            ax.axhline(limit, ls="--", lw=1.2, color="#e4572e", label="accuracy budget", gid="budget")
        for c in finite:
            where = (c.throughput, c.accuracy.value)
            ax.annotate(_short(c.name), where, xytext=(5, 4), textcoords="offset points", fontsize=7, parse_math=False)
        ax.set_xlabel(f"throughput (samples/s at batch {report.budget.serving_batch_size})")
        ax.set_ylabel(f"{acc.metric} ({'higher' if acc.higher_is_better else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.1, y=0.08)
        legend = ax.legend(loc="best", fontsize=8)
        for text in legend.get_texts():
            text.set_parse_math(False)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
