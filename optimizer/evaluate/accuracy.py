"""Accuracy on the validation split: classification, regression, or fidelity to the baseline.

By default the task follows the labels (:func:`infer_task`): integer or boolean labels mean
classification (top-1, and top-5 with at least five classes), float labels mean regression (MSE,
MAE), and no labels mean fidelity: how close a candidate's outputs stay to the original model's
(mean per-sample cosine similarity, maximum relative error). A task and a primary metric can also
be chosen (:func:`resolve_task`, :func:`resolve_metric`); forced fidelity ignores any labels.
The metrics are a few lines of numpy each; scikit-learn's versions would need the same reshaping
and add an import for no gain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from optimizer.errors import InvalidConfig, InvalidData, InvalidModel, UnsupportedModel
from optimizer.evaluate.latency import fixed_batch_size, run_feed
from optimizer.report import AccuracyResult

if TYPE_CHECKING:
    import onnxruntime as ort

    from optimizer.data import SampleData

Task = Literal["classification", "regression", "fidelity"]
TaskOption = Literal["auto", "classification", "regression", "fidelity"]

#: The metrics each task computes, its default primary metric first.
TASK_METRICS: dict[Task, tuple[str, ...]] = {
    "classification": ("top1", "top5"),
    "regression": ("mse", "mae"),
    "fidelity": ("cosine", "max_rel_error"),
}
#: Whether a larger value of a metric is better (accuracies and similarity) or worse (errors).
HIGHER_IS_BETTER: dict[str, bool] = {
    "top1": True,
    "top5": True,
    "mse": False,
    "mae": False,
    "cosine": True,
    "max_rel_error": False,
}

_RELATIVE_FLOOR = 1e-12  # |baseline| below this counts as zero when computing relative drops


def infer_task(labels: np.ndarray | None) -> Task:
    """Integer/bool labels: classification; float labels: regression; no labels: fidelity."""
    if labels is None:
        return "fidelity"
    kind = np.asarray(labels).dtype.kind
    if kind in "iub":
        return "classification"
    if kind == "f":
        return "regression"
    raise InvalidData(f"labels must be integers, booleans or floats, got dtype {labels.dtype}")


def resolve_task(labels: np.ndarray | None, task: TaskOption = "auto") -> Task:
    """The task to score by: inferred from ``labels`` for ``"auto"``, else ``task`` if the labels fit it.

    ``"fidelity"`` always fits (labels are then ignored); ``"classification"`` needs integer or
    boolean labels and ``"regression"`` float labels, else InvalidData.
    """
    if task == "auto":
        return infer_task(labels)
    if task == "fidelity":
        return "fidelity"
    if task not in ("classification", "regression"):
        raise InvalidConfig(f"unknown task {task!r}; choose auto, classification, regression or fidelity")
    wanted = "integer class labels" if task == "classification" else "float target labels"
    if labels is None:
        raise InvalidData(f"task {task} needs {wanted} in the sample data (a 'labels' array), found none")
    found = infer_task(labels)
    if found != task:
        hint = "store class indices as integers" if task == "classification" else "store the targets as floats"
        raise InvalidData(f"task {task} needs {wanted}, but the labels are {labels.dtype} ({found}); {hint}")
    return task


def metric_problem(task: TaskOption, metric: str | None) -> str | None:
    """What is wrong with ``metric`` for ``task`` (any task's metric passes ``"auto"``), else None.

    Phrased to follow the option's name (``metric: 'mse' does not fit task classification; ...``).
    None (the task's default) always passes.
    """
    if metric is None:
        return None
    if task == "auto":
        known = [name for names in TASK_METRICS.values() for name in names]
        if metric not in known:
            return f"{metric!r} is unknown; choose {', '.join(known[:-1])} or {known[-1]}"
        return None
    if task not in TASK_METRICS:
        return f"task {task!r} is unknown; choose auto, classification, regression or fidelity"
    if metric not in TASK_METRICS[task]:
        return f"{metric!r} does not fit task {task}; choose {' or '.join(TASK_METRICS[task])}"
    return None


def resolve_metric(task: Task, metric: str | None, inferred: bool = False) -> str:
    """The primary metric for ``task``: ``metric``, or the task's default when None.

    ``inferred`` says the task came from the labels (``task="auto"``), for a clearer refusal.
    """
    if metric is None:
        return TASK_METRICS[task][0]
    if metric not in TASK_METRICS[task]:
        why = f"the labels make this a {task} task" if inferred else f"it does not fit task {task}"
        raise InvalidConfig(f"metric {metric!r} cannot be used: {why}; choose {' or '.join(TASK_METRICS[task])}")
    return metric


def predict(session: ort.InferenceSession, data: SampleData, batch_size: int) -> list[np.ndarray]:
    """Every output of ``session`` over all samples, in the session's output order.

    Samples are fed ``batch_size`` at a time; a model whose inputs have a fixed first axis ``B``
    is fed exactly ``B`` samples per call, the last batch padded by repeating its final sample and
    the padding trimmed from the outputs.
    """
    count = len(data)
    if count == 0:
        raise InvalidData("no samples to evaluate")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    fixed = fixed_batch_size(session)
    step = fixed or batch_size
    names = [out.name for out in session.get_outputs()]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for feed in data.batches(step):
        real = fed = len(next(iter(feed.values())))
        if fixed is not None and real < fixed:
            feed = {k: np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)]) for k, v in feed.items()}
            fed = fixed
        for index, value in enumerate(run_feed(session, feed)):
            if not isinstance(value, np.ndarray):
                raise UnsupportedModel(f"output {names[index]!r} is not a tensor (sequence or map outputs)")
            if value.ndim == 0 or value.shape[0] != fed:
                raise UnsupportedModel(f"output {names[index]!r} has no per-sample first axis")
            chunks[index].append(value[:real])
    return [np.concatenate(parts, axis=0) for parts in chunks]


def score(
    outputs: list[np.ndarray],
    data: SampleData,
    reference: list[np.ndarray] | None = None,
    *,
    task: TaskOption = "auto",
    metric: str | None = None,
) -> AccuracyResult:
    """Score ``outputs`` (from :func:`predict`) against ``data.labels`` or, without labels, ``reference``.

    ``task`` (see :func:`resolve_task`) and ``metric`` (one of the task's :data:`TASK_METRICS`;
    None = its default) choose the primary value; forced ``"fidelity"`` ignores the labels.

    Classification reads the first output as scores ``[N, C]``: top-1 (and top-5 when C >= 5).
    A single score per sample is binary (threshold 0.5 when all scores lie in [0, 1], else 0 for
    logits); an integer first output is taken as predicted labels. Regression: ``mse`` (primary)
    and ``mae``. Fidelity: ``cosine`` (primary) and ``max_rel_error`` against ``reference``, which
    is then required (the baseline scored against its own outputs gets cosine 1.0). With labels
    and a reference, the fidelity values are added to ``metrics`` too.
    """
    if not outputs:
        raise UnsupportedModel("the model has no outputs to score")
    count = len(data)
    chosen = resolve_task(data.labels, task)
    primary = resolve_metric(chosen, metric, inferred=task == "auto")
    metrics: dict[str, float] = {}
    if reference is not None:
        metrics.update(fidelity(outputs, reference))
    if chosen == "fidelity":
        if reference is None:
            raise ValueError("fidelity scoring needs the baseline's outputs as reference")
        return _result(chosen, primary, metrics, count)
    assert data.labels is not None  # resolve_task returned a labelled task
    labels = np.asarray(data.labels)
    first = np.asarray(outputs[0])
    if labels.shape[:1] != (count,) or first.shape[:1] != (count,):
        raise InvalidData(
            f"expected one label and one output row per sample ({count}), "
            f"got labels {labels.shape} and output {first.shape}"
        )
    if chosen == "classification":
        if labels.size != count:
            raise InvalidData(f"classification labels must be one class per sample, got shape {labels.shape}")
        metrics.update(_classification(first, labels.reshape(count)))
    else:
        metrics.update(_regression(first, labels))
    if primary not in metrics:  # top5 is computed only with at least five class scores
        width = first.reshape(count, -1).shape[1]
        raise InvalidData(f"metric {primary} needs at least 5 class scores per sample, the model outputs {width}")
    return _result(chosen, primary, metrics, count)


def _result(task: Task, metric: str, metrics: dict[str, float], count: int) -> AccuracyResult:
    return AccuracyResult(
        task=task,
        metric=metric,
        value=metrics[metric],
        higher_is_better=HIGHER_IS_BETTER[metric],
        metrics=metrics,
        samples=count,
    )


def _classification(first: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    scores = first.reshape(len(labels), -1)
    classes = scores.shape[1]
    if classes == 1:
        values = scores[:, 0]
        if values.dtype.kind in "iub":  # the model already outputs predicted labels
            predicted = values.astype(np.int64)
        else:
            values = values.astype(np.float64)
            threshold = 0.5 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 0.0
            predicted = (values > threshold).astype(np.int64)
        return {"top1": float(np.mean(predicted == labels.astype(np.int64)))}
    result = {"top1": float(np.mean(np.argmax(scores, axis=1) == labels))}
    if classes >= 5:
        top5 = np.argpartition(-scores.astype(np.float64), 4, axis=1)[:, :5]
        result["top5"] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    return result


def _regression(first: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MSE and MAE over every target value; labels hold one value or one row per sample."""
    count = len(labels)
    predicted = first.astype(np.float64).reshape(count, -1)
    targets = labels.astype(np.float64).reshape(count, -1)
    if predicted.shape != targets.shape:
        raise InvalidData(
            f"regression labels have {targets.shape[1]} value(s) per sample but the first output has "
            f"{predicted.shape[1]}"
        )
    error = predicted - targets
    return {"mse": float(np.mean(error**2)), "mae": float(np.mean(np.abs(error)))}


def fidelity(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """``cosine``: mean per-sample cosine similarity of all outputs flattened and concatenated;
    ``max_rel_error``: max |output - reference| over max |reference|.

    Two zero vectors have cosine 1, one zero vector against a non-zero one 0. A sample with NaN or
    infinite values scores 1 only when it equals the reference exactly, else 0; such a mismatch
    makes ``max_rel_error`` infinite.
    """
    if len(outputs) != len(reference):
        raise InvalidModel(f"the model has {len(outputs)} outputs but the original has {len(reference)}")
    count = len(reference[0]) if reference and np.ndim(reference[0]) else 0
    got = _flatten(outputs, count)
    want = _flatten(reference, count)
    if got.shape != want.shape:
        raise InvalidModel(
            f"output shapes differ from the original model's ({got.shape[1]} vs {want.shape[1]} values per sample)"
        )
    finite = np.isfinite(got).all(axis=1) & np.isfinite(want).all(axis=1)
    with np.errstate(all="ignore"):
        norm_got = np.linalg.norm(got, axis=1)
        norm_want = np.linalg.norm(want, axis=1)
        cosine = np.sum(got * want, axis=1) / (norm_got * norm_want)
    cosine[(norm_got == 0) & (norm_want == 0)] = 1.0
    cosine[(norm_got == 0) ^ (norm_want == 0)] = 0.0
    for row in np.flatnonzero(~finite):
        cosine[row] = 1.0 if np.array_equal(got[row], want[row], equal_nan=True) else 0.0
    cosine = np.clip(cosine, -1.0, 1.0)

    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(all="ignore"):
        diff = np.where(same, 0.0, np.abs(got - want))
    worst = float(np.max(diff)) if diff.size else 0.0
    finite_want = np.abs(want[np.isfinite(want)])
    scale = float(finite_want.max()) if finite_want.size else 0.0
    if not np.isfinite(worst):
        rel = float("inf")
    elif scale == 0.0:
        rel = 0.0 if worst == 0.0 else float("inf")
    else:
        rel = worst / scale
    return {"cosine": float(np.mean(cosine)) if cosine.size else 1.0, "max_rel_error": rel}


def _flatten(arrays: list[np.ndarray], count: int) -> np.ndarray:
    """``[count, values]`` float64: every array's per-sample values, concatenated."""
    parts = []
    for array in arrays:
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] != count:
            raise InvalidModel(f"an output has {array.shape[:1]} rows where {count} samples were expected")
        parts.append(array.reshape(count, -1).astype(np.float64))
    return np.concatenate(parts, axis=1) if parts else np.zeros((count, 0))


def accuracy_drop(baseline: AccuracyResult, candidate: AccuracyResult, relative: bool = False) -> float:
    """How much worse ``candidate`` is than ``baseline``: positive means worse.

    In the metric's units (``baseline - candidate`` for higher-is-better metrics, ``candidate -
    baseline`` otherwise), or as a fraction of ``|baseline|`` when ``relative`` (a zero baseline
    is floored at 1e-12, so any loss against a perfect zero error is huge, not a division by zero).
    """
    if baseline.metric != candidate.metric:
        raise ValueError(f"cannot compare {candidate.metric!r} with {baseline.metric!r}")
    diff = baseline.value - candidate.value if baseline.higher_is_better else candidate.value - baseline.value
    if not relative:
        return float(diff)
    return float(diff / max(abs(baseline.value), _RELATIVE_FLOOR))
