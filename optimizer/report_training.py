"""The report's training section: pruning and fine-tuning runs, read from the candidates' pass details.

Each fine-tuning step shared by several candidates ran once; it is shown once, under the first
candidate that used it. For each run: the learning curve (train and validation loss per epoch, as
an inline SVG), where early stopping stopped and which epoch's weights were kept, every
hyperparameter trial and its score, the precision (and why), and the devices. Pruning steps show
the parameter, multiply-add and channel counts before and after.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from typing import Any

from optimizer.report import Report

_log = logging.getLogger(__name__)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def training_runs(report: Report) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """``(candidate, training details, pruning details or None)`` per distinct fine-tuning run."""
    runs: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    seen: set[str] = set()
    for candidate in report.candidates:
        pruning: dict[str, Any] | None = None
        for step in candidate.passes:
            details = step.get("details") or {}
            if "pruning" in details:
                pruning = details["pruning"]
            training = details.get("training")
            if not isinstance(training, dict):
                continue
            key = json.dumps([pruning, training], sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                runs.append((candidate.name, training, pruning))
    return runs


def render_training(report: Report) -> str:
    """The HTML section (empty string when no candidate was trained)."""
    runs = training_runs(report)
    if not runs:
        return ""
    parts = ["<h2>Pruning and fine-tuning</h2>"]
    for name, training, pruning in runs:
        parts.append(f"<h3>{_e(name)}</h3>")
        if pruning:
            parts.append(_pruning(pruning))
        parts.append(_summary(training))
        parts.append(f'<div class="plot">{_curve_or_note(training)}</div>')
        parts.append(_trials(training))
    return "\n".join(parts)


def _pruning(info: dict[str, Any]) -> str:
    def pair(before: Any, after: Any) -> str:
        return "-" if before is None or after is None else f"{before:,} → {after:,}"

    rows = [
        ("method", f"{info.get('method')} {round(100 * float(info.get('ratio', 0)))}%"),
        ("importance", info.get("importance") or "-"),
        ("parameters", pair(info.get("params_before"), info.get("params_after"))),
        ("multiply-adds per sample", pair(info.get("macs_before"), info.get("macs_after"))),
        ("channels", pair(info.get("channels_before"), info.get("channels_after"))),
    ]
    if int(info.get("steps") or 1) > 1:
        rows.append(("steps", _steps(info)))
    if info.get("global_pruning"):
        rows.append(("ranking", "global (channels ranked across layers)"))
    if info.get("sparsity") is not None:
        zeros = f"{100 * float(info['sparsity']):.1f}%"
        rows.append(("zero weights", f"{zeros} (same shapes: smaller when compressed, not faster)"))
    return _table(rows)


def _steps(info: dict[str, Any]) -> str:
    """The step count and what the training between the steps reached."""
    runs = info.get("step_training") or []
    text = str(info.get("steps"))
    if not runs:
        return text
    epochs = sorted({int(r.get("epochs") or 0) for r in runs})
    scores = [r.get("val_accuracy") for r in runs]
    measured = ", ".join(_num(v) for v in scores) if all(v is not None for v in scores) else ""
    losses = ", ".join(_num(r.get("best_val_loss")) for r in runs)
    what = f"val accuracy {measured}" if measured else f"val loss {losses}"
    return f"{text} (fine-tuned {'/'.join(map(str, epochs))} epochs between steps: {what})"


def _distillation(training: dict[str, Any]) -> str | None:
    """How the teacher was used, or None when it was not."""
    if training.get("temperature") is None:
        return None
    parts = [f"temperature {training['temperature']}"]
    if training.get("distill_weight") is not None:
        parts.insert(0, f"weight {training['distill_weight']} (the rest: cross-entropy on the labels)")
    return ", ".join(parts)


def _augmentation(views: int) -> str:
    return f"{views} shifted, noisy copies of the training inputs (one per epoch), the teacher's outputs as targets"


def _summary(training: dict[str, Any]) -> str:
    stopped = training.get("stopped_epoch")
    note = training.get("precision_note")
    optimizer = f"{training.get('optimizer')}, lr {training.get('lr')}, weight decay {training.get('weight_decay')}"
    kept = f"epoch {training.get('best_epoch')}" + (" (the best, restored)" if training.get("restored_best") else "")
    rows = [
        ("loss", training.get("loss")),
        *([("distillation", distill)] if (distill := _distillation(training)) else []),
        *([("augmentation", _augmentation(views))] if (views := int(training.get("augment_views") or 0)) else []),
        ("optimizer", optimizer),
        ("batch size", training.get("batch_size")),
        ("precision", f"{training.get('precision')}" + (f" ({note})" if note else "")),
        ("devices", ", ".join(str(d) for d in training.get("devices") or [])),
        ("early stopping", f"stopped after epoch {stopped}" if stopped is not None else "ran every epoch"),
        ("weights kept", kept),
        ("seconds", f"{float(training.get('seconds') or 0):.1f}"),
    ]
    return _table(rows)


def _trials(training: dict[str, Any]) -> str:
    trials = training.get("trials") or []
    if len(trials) <= 1:
        return ""
    head = "<tr><th>lr</th><th>batch</th><th>best val loss</th><th>best epoch</th><th>epochs</th><th>s</th></tr>"
    body = "".join(
        f"<tr><td>{_e(t.get('lr'))}</td><td>{_e(t.get('batch_size'))}</td><td>{_num(t.get('best_val_loss'))}</td>"
        f"<td>{_e(t.get('best_epoch'))}</td><td>{_e(t.get('epochs_run'))}</td><td>{_num(t.get('seconds'))}</td></tr>"
        for t in trials
    )
    summary = f"<summary>Hyperparameter search ({len(trials)} trials)</summary>"
    return f"<details open>{summary}<table>{head}{body}</table></details>"


def _num(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{number:.4g}" if math.isfinite(number) else "-"


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="dl">{cells}</table>'


def _curve_or_note(training: dict[str, Any]) -> str:
    try:
        return curve_svg(training)
    except Exception as exc:  # a broken plot must not cost the user the rest of the report
        _log.warning("learning curve plot failed: %s", exc)
        return '<p class="muted">The learning curve could not be drawn.</p>'


def curve_svg(training: dict[str, Any]) -> str:
    """Train and validation loss per epoch, the kept epoch marked (``id="best-epoch"``), as inline SVG."""
    import matplotlib
    from matplotlib.figure import Figure

    history = training.get("history") or []
    epochs = [int(h["epoch"]) for h in history]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "slimserve", "font.size": 9}):
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train loss", color="#4a5563")
        ax.plot(epochs, [h["val_loss"] for h in history], "o-", ms=3, label="validation loss", color="#2a9d4b")
        best = training.get("best_epoch")
        if best is not None:
            ax.axvline(best, ls="--", lw=1.2, color="#e4572e", label=f"kept: epoch {best}", gid="best-epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]
