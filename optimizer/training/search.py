"""Fine-tuning entry point: precision choice, time budget, and the lr / batch-size search.

Why our own search: the grid is a handful of (lr, batch) pairs each trained with early stopping
from the same starting weights; Optuna / Ray Tune would add a dependency and a scheduler for a
dozen lines. Random search draws lr log-uniformly between the smallest and largest ``lr_choices``
and a batch size from ``batch_choices`` (Bergstra & Bengio), seeded.

Precision "auto" on CPU times a few training steps of a copy of the model on the first batch
under bf16 autocast and fp32, and keeps bf16 only when it is not slower (bf16 many times slower
ends its probe early). The answer is kept for the process, per device and kinds of layers: it is
the CPU's, so later runs (other pruning ratios, the steps of gradual pruning) skip the probe. The
same timing (or one of the chosen precision) estimates an epoch for the deadline.
"""

from __future__ import annotations

import copy
import math
import random
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer.data import SampleData
from optimizer.errors import InvalidConfig, PassFailed
from optimizer.training.augment import AugmentMode
from optimizer.training.ddp import SINGLE, Dist, agree
from optimizer.training.early_stopping import copy_state
from optimizer.training.loop import (
    EpochRecord,
    LossKind,
    NonFinite,
    Precision,
    Prepared,
    Teacher,
    autocast,
    check_output,
    compute_loss,
    prepare,
    run,
)

if TYPE_CHECKING:
    import torch

_PROBE_STEPS = 3


class FinetuneConfig(BaseModel):
    """How to fine-tune: optimizer, early stopping, precision, search and processes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=60, ge=1)  # an upper bound: early stopping ends most runs sooner
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0)  # sgd and rmsprop
    batch_size: int = Field(default=64, ge=1)
    monitor: str = "val_loss"
    patience: int = Field(default=3, ge=0)
    min_delta: float = Field(default=0.0, ge=0)
    # Keras's ReduceLROnPlateau: lr x factor after this many epochs without improvement (None: off)
    reduce_lr_patience: int | None = Field(default=2, ge=0)
    reduce_lr_factor: float = Field(default=0.3, gt=0, lt=1)
    mode: Literal["auto", "min", "max"] = "auto"
    restore_best_weights: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    search: Literal["none", "grid", "random"] = "none"
    lr_choices: tuple[float, ...] = Field(default=(3e-4, 1e-3, 3e-3), min_length=1)
    batch_choices: tuple[int, ...] = Field(default=(32, 64), min_length=1)
    trials: int = Field(default=4, ge=1)  # random search
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    # Distillation (with a teacher): the weight of its term next to cross-entropy on the labels,
    # and the temperature that softens both distributions.
    distill_weight: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=2.0, gt=0)
    # Shifted, noisy copies of image inputs with the teacher's outputs as targets ("auto": for
    # float [N, C, H, W] inputs with H, W >= 16 when distilling); augment_views copies are made.
    augment: AugmentMode = "auto"
    augment_views: int = Field(default=8, ge=1)
    workers: int | Literal["auto"] = "auto"  # DDP processes; "auto": every CUDA device when there are several


class TrialRecord(BaseModel):
    """One run of the search (one lr / batch-size pair)."""

    lr: float
    batch_size: int
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float


class TrainingReport(BaseModel):
    """What one fine-tuning shows in the optimizer report (JSON-able)."""

    loss: LossKind
    optimizer: str
    lr: float
    batch_size: int
    weight_decay: float
    precision: str
    precision_note: str | None
    devices: list[str]
    history: list[EpochRecord]
    best_epoch: int
    stopped_epoch: int | None
    restored_best: bool
    trials: list[TrialRecord]
    seconds: float
    distill_weight: float | None = None  # with labels and a teacher
    temperature: float | None = None  # when distilling
    augment_views: int = 0  # augmented copies of the training inputs (0: none)


def candidates(config: FinetuneConfig, seed: int) -> list[tuple[float, int]]:
    """The (lr, batch_size) pairs to try, in order."""
    if config.search == "none":
        return [(config.lr, config.batch_size)]
    if config.search == "grid":
        return [(lr, b) for lr in config.lr_choices for b in config.batch_choices]
    rng = random.Random(seed)
    low, high = math.log(min(config.lr_choices)), math.log(max(config.lr_choices))
    return [
        (float(f"{math.exp(rng.uniform(low, high)):.3g}"), rng.choice(config.batch_choices))
        for _ in range(config.trials)
    ]


def time_steps(
    module: torch.nn.Module,
    data: Prepared,
    precision: Precision,
    batch_size: int,
    device: str,
    limit: float | None = None,
) -> float:
    """Seconds per training step of a copy of ``module`` on the first batch (after one warm-up).

    With ``limit``, stops once the probe has taken that many seconds (warm-up included) and
    returns what it measured so far (the warm-up step itself when nothing else ran).
    """
    import torch

    probe = copy.deepcopy(module).to(device).train()
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
    batch = [t[:batch_size].to(device) for t in data.train]
    cuda = torch.device(device).type == "cuda"
    elapsed = total = 0.0
    measured = 0
    for step in range(_PROBE_STEPS + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            output = probe(*batch[:-1])
        compute_loss(data, output, batch[-1]).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        total += seconds
        if step > 0:
            elapsed += seconds
            measured += 1
        if limit is not None and total > limit:
            break
    return elapsed / measured if measured else total


#: CPU precision choices by (device, kinds of layers): bf16's speed against fp32 is the CPU's
#: (AVX-512 BF16 / AMX or not) for a kind of network, so one probe per process serves every
#: pruning ratio and job after it.
_CPU_CHOICE: dict[tuple[str, tuple[str, ...]], tuple[Precision, str]] = {}


def choose_precision(
    module: torch.nn.Module, data: Prepared, requested: str, device: str, batch_size: int
) -> tuple[Precision, str | None, float | None]:
    """(precision, why, seconds per step when measured) for ``requested`` on ``device``."""
    import torch

    if torch.device(device).type == "cuda":
        if requested == "auto":
            if torch.cuda.is_bf16_supported():
                return "bf16", None, None
            return "fp16", "this GPU has no bf16 support: fp16 with GradScaler", None
        return requested, None, None  # type: ignore[return-value]
    if requested == "fp16":
        return "fp32", "fp16 autocast is not used on CPU: trained in fp32", None
    if requested in ("fp32", "bf16"):
        return requested, None, None  # type: ignore[return-value]
    kinds = tuple(sorted({type(m).__name__ for m in module.modules() if any(True for _ in m.parameters(False))}))
    key = (str(torch.device(device)), kinds)
    if key in _CPU_CHOICE:
        return (*_CPU_CHOICE[key], None)
    start = time.perf_counter()
    fp32 = time_steps(module, data, "fp32", batch_size, device)
    # bf16 many times slower (CPUs without bf16 instructions) is clear long before its 4 steps end.
    bf16 = time_steps(module, data, "bf16", batch_size, device, limit=4 * (time.perf_counter() - start))
    if bf16 <= fp32:
        choice: tuple[Precision, str] = (
            "bf16",
            f"bf16 autocast measured {fp32 / bf16:.1f}x the speed of fp32 on this CPU",
        )
    else:
        choice = ("fp32", f"bf16 autocast measured {bf16 / fp32:.1f}x slower than fp32 on this CPU")
    _CPU_CHOICE[key] = choice
    return (*choice, bf16 if choice[0] == "bf16" else fp32)


def epoch_seconds(step_seconds: float, data: Prepared, batch_size: int, workers: int) -> float:
    """Estimated seconds for one epoch (training steps plus a cheaper validation pass)."""
    samples = len(data.train[0]) * (2 if data.views else 1)
    steps = math.ceil(samples / batch_size) + math.ceil(len(data.val[0]) / batch_size) / 3
    return step_seconds * steps / workers


def run_search(
    module: torch.nn.Module,
    data: Prepared,
    config: FinetuneConfig,
    *,
    precision: Precision,
    note: str | None,
    device: str,
    deadline: float | None,
    seed: int,
    dist: Dist = SINGLE,
) -> TrainingReport:
    """Every candidate from the same starting weights; the module ends with the winner's weights.

    ``devices`` and ``seconds`` of the returned report are left for the caller to fill in.
    """
    initial = copy_state(module.state_dict())
    trials: list[TrialRecord] = []
    best: tuple[float, dict[str, Any], Any, int, Precision] | None = None
    for index, (lr, batch_size) in enumerate(candidates(config, seed)):
        if index > 0 and deadline is not None:
            mean_epoch = sum(t.seconds / t.epochs_run for t in trials) / len(trials)
            if agree(time.monotonic() + 2 * mean_epoch > deadline, dist, device):
                break
        module.load_state_dict(initial)
        kwargs: dict[str, Any] = {"lr": lr, "batch_size": batch_size, "device": device, "deadline": deadline}
        try:
            outcome = run(module, data, config, precision=precision, seed=seed, dist=dist, **kwargs)
        except NonFinite as exc:
            if precision == "fp32":
                raise PassFailed(f"training diverged: non-finite loss at epoch {exc.epoch}") from None
            note = f"fell back to fp32: non-finite loss under {precision} at epoch {exc.epoch}"
            precision = "fp32"
            module.load_state_dict(initial)
            try:
                outcome = run(module, data, config, precision=precision, seed=seed, dist=dist, **kwargs)
            except NonFinite as again:
                raise PassFailed(f"training diverged: non-finite loss at epoch {again.epoch}") from None
        trials.append(
            TrialRecord(
                lr=lr,
                batch_size=batch_size,
                best_val_loss=outcome.best_val_loss,
                best_epoch=outcome.best_epoch,
                epochs_run=len(outcome.history),
                seconds=outcome.seconds,
            )
        )
        if best is None or outcome.best_val_loss < best[0]:
            best = (outcome.best_val_loss, copy_state(module.state_dict()), outcome, index, precision)
    assert best is not None
    _, state, outcome, index, used = best
    module.load_state_dict(state)
    return TrainingReport(
        loss=data.loss,
        optimizer=config.optimizer,
        lr=trials[index].lr,
        batch_size=trials[index].batch_size,
        weight_decay=config.weight_decay,
        precision=used,
        precision_note=note,
        devices=[],
        history=outcome.history,
        best_epoch=outcome.best_epoch,
        stopped_epoch=outcome.stopped_epoch,
        restored_best=outcome.restored_best,
        trials=trials,
        seconds=0.0,
        distill_weight=data.distill_weight if data.loss == "cross_entropy+distillation" else None,
        temperature=data.temperature if data.logits else None,
        augment_views=len(data.views),
    )


def resolve_workers(workers: int | str, device: str) -> int:
    """The number of training processes ("auto": every CUDA device when there are several); checks ``device``."""
    import torch

    try:
        cuda = torch.device(device).type == "cuda"
    except RuntimeError as exc:
        raise InvalidConfig(f"unknown training device {device!r}") from exc
    count = torch.cuda.device_count() if cuda else 0
    if cuda and not torch.cuda.is_available():
        raise InvalidConfig(f"device {device!r} requested but torch sees no CUDA device")
    if workers == "auto":
        return count if count > 1 else 1
    if not isinstance(workers, int) or workers < 1:
        raise InvalidConfig(f"workers must be a positive integer or 'auto', got {workers!r}")
    if cuda and workers > count:
        raise InvalidConfig(f"workers={workers} but only {count} CUDA device(s) are visible")
    return workers


def fine_tune(
    module: torch.nn.Module,
    train: SampleData,
    val: SampleData | None,
    config: FinetuneConfig,
    *,
    input_names: list[str],
    teacher: Teacher | None = None,
    device: str = "cpu",
    deadline: float | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, TrainingReport]:
    """Fine-tune ``module`` on ``train`` (early-stopped on ``val``); returns it with its report.

    The module's forward takes the inputs positionally in ``input_names`` order and returns one
    tensor. It is trained in place and returned on ``device``. Raises InvalidConfig / InvalidData
    for unusable settings or data and PassFailed when training diverges or the ``deadline``
    (a ``time.monotonic()`` value) leaves no room for one epoch.
    """
    import torch

    # Mostly-zero inputs (images) drive small gradients into denormals, which make CPU backward
    # passes several times slower unless they are flushed to zero.
    flushing = torch.set_flush_denormal(True)
    try:
        return _fine_tune(module, train, val, config, input_names, teacher, device, deadline, seed)
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def _fine_tune(
    module: torch.nn.Module,
    train: SampleData,
    val: SampleData | None,
    config: FinetuneConfig,
    input_names: list[str],
    teacher: Teacher | None,
    device: str,
    deadline: float | None,
    seed: int,
) -> tuple[torch.nn.Module, TrainingReport]:
    import torch

    started = time.monotonic()
    torch.manual_seed(seed)
    workers = resolve_workers(config.workers, device)
    if config.batch_size < workers or (min(config.batch_choices) < workers and config.search != "none"):
        raise InvalidConfig(f"the batch size must be at least the number of workers ({workers})")
    float_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    data = prepare(
        train,
        val,
        input_names=input_names,
        teacher=teacher,
        val_fraction=config.val_fraction,
        seed=seed,
        float_dtype=float_dtype,
        distill_weight=config.distill_weight,
        temperature=config.temperature,
        augment=config.augment,
        augment_views=config.augment_views,
    )
    if config.monitor not in ("val_loss", "train_loss") and not (config.monitor == "val_accuracy" and data.classifies):
        raise InvalidConfig(f"cannot monitor {config.monitor!r} for a {data.loss} run")
    module.to(device)
    check_output(module, data, device)
    first_batch = candidates(config, seed)[0][1]
    precision, note, step = choose_precision(module, data, config.precision, device, first_batch)
    if deadline is not None:
        step = step if step is not None else time_steps(module, data, precision, first_batch, device)
        needed = epoch_seconds(step, data, first_batch, workers)
        if time.monotonic() + needed > deadline:
            raise PassFailed(f"the time budget is too small for one epoch (needs ~{needed:.1f} s)")
    options: dict[str, Any] = {"precision": precision, "note": note, "deadline": deadline, "seed": seed}
    if workers > 1:
        from optimizer.training.ddp import fine_tune_distributed

        report = fine_tune_distributed(module, data, config, device=device, workers=workers, **options)
    else:
        report = run_search(module, data, config, device=device, **options)
        name = str(torch.device(device))
        if name == "cuda":
            name = f"cuda:{torch.cuda.current_device()}"
        report = report.model_copy(update={"devices": [name]})
    return module, report.model_copy(update={"seconds": time.monotonic() - started})
