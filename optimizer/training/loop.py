"""One fine-tuning run: data tensors, loss, optimizer, mixed precision, early stopping, history.

Built on torch itself (``torch.optim``, ``torch.amp`` autocast and GradScaler, DataLoader with a
``DistributedSampler``). The sampler is used in single-process runs too (one replica): both paths
then draw the same permutation each epoch (seeded with ``seed + epoch``), so a run on N DDP
processes with ``batch_size // N`` per rank sees exactly the single-process global batches.
Epochs are numbered from 1. torch is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel

from optimizer.data import SampleData
from optimizer.errors import InvalidConfig, InvalidData, OptimizerError, PassFailed, first_line
from optimizer.training import augment as augmentation
from optimizer.training.augment import AugmentMode
from optimizer.training.ddp import SINGLE, Dist, agree
from optimizer.training.early_stopping import EarlyStopping

if TYPE_CHECKING:
    import torch

    from optimizer.training.search import FinetuneConfig

LossKind = Literal["cross_entropy", "mse", "distillation", "cross_entropy+distillation"]
Precision = Literal["fp32", "bf16", "fp16"]
Teacher = Callable[[dict[str, np.ndarray]], np.ndarray]
#: Augmented copies of the training set made once (one is read each epoch, next to the originals).
VIEW_BYTES = 256 * 2**20  # at most this much memory for them: fewer copies for large samples


class EpochRecord(BaseModel):
    """One epoch of one run."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None
    seconds: float


@dataclass
class Prepared:
    """Training and validation tensors (CPU, contiguous), prepared once for every trial."""

    train: list[torch.Tensor]  # model inputs in input_names order, then the target
    val: list[torch.Tensor]
    loss: LossKind
    logits: bool  # distillation: KL on softened logits (True) or MSE on values (False)
    # cross_entropy+distillation: the target is [label, teacher logits...] in one float tensor;
    # label -1 marks an augmented sample, trained on the teacher's outputs only
    distill_weight: float = 0.5  # with labels and a teacher: the distillation term's weight
    temperature: float = 2.0  # distillation softens both distributions by this much (Hinton et al.)
    views: tuple[list[torch.Tensor], ...] = ()  # augmented copies of ``train``, targets from the teacher

    @property
    def classifies(self) -> bool:
        """Whether the targets hold class labels (and validation accuracy is measured)."""
        return self.loss in ("cross_entropy", "cross_entropy+distillation")


class NonFinite(Exception):
    """Raised inside a run when the loss stops being finite (the caller decides what follows)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"non-finite loss at epoch {epoch}")
        self.epoch = epoch


@dataclass
class RunOutcome:
    """The result of one run; the module holds the weights it returns."""

    history: list[EpochRecord]
    best_epoch: int
    stopped_epoch: int | None
    restored_best: bool
    best_val_loss: float
    seconds: float


def loss_kind(labels: np.ndarray | None, teacher: bool = False) -> LossKind:
    """cross_entropy for integer labels (plus distillation with a teacher), mse for float labels,
    distillation without labels."""
    if labels is None:
        return "distillation"
    if labels.dtype.kind in "iub":
        return "cross_entropy+distillation" if teacher else "cross_entropy"
    if labels.dtype.kind == "f":
        return "mse"
    raise InvalidData(f"labels must be integers or floats for fine-tuning, got {labels.dtype}")


def _split(data: SampleData, fraction: float, seed: int) -> tuple[SampleData, SampleData]:
    if len(data) < 2:
        raise InvalidData("fine-tuning needs at least 2 samples")
    order = np.random.default_rng(seed).permutation(len(data))
    count = min(max(1, round(len(data) * fraction)), len(data) - 1)
    return data.take(np.sort(order[count:])), data.take(np.sort(order[:count]))


def _teacher_outputs(teacher: Teacher, data: SampleData) -> np.ndarray:
    try:
        parts = [np.asarray(teacher(feed)) for feed in data.batches(256)]
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    except OptimizerError:
        raise
    except Exception as exc:
        raise PassFailed(f"the teacher model failed on the sample data: {first_line(exc)}") from exc


def prepare(
    train: SampleData,
    val: SampleData | None,
    *,
    input_names: list[str],
    teacher: Teacher | None,
    val_fraction: float,
    seed: int,
    float_dtype: torch.dtype,
    distill_weight: float = 0.5,
    temperature: float = 2.0,
    augment: AugmentMode = "off",
    augment_views: int = 8,
) -> Prepared:
    """Tensors for training and validation; teacher outputs computed once when distilling.

    ``augment`` (see :mod:`optimizer.training.augment`) adds up to ``augment_views`` shifted,
    noisy copies of the training inputs with the teacher's outputs on them as targets.
    """
    import torch

    kind = loss_kind(train.labels, teacher is not None)
    if kind == "distillation" and teacher is None:
        raise InvalidConfig("fine-tuning needs labels or a teacher model")
    if val is None:
        train, val = _split(train, val_fraction, seed)
    if len(train) == 0 or len(val) == 0:
        raise InvalidData("fine-tuning needs training and validation samples")
    if (val.labels is None) != (train.labels is None):
        raise InvalidData("training and validation data must both have labels or both not")
    missing = [n for n in input_names if n not in train.inputs or n not in val.inputs]
    if missing:
        raise InvalidData(f"sample data has no input named {missing[0]!r}")

    def tensors(part: SampleData, labelled: bool = True) -> list[torch.Tensor]:
        out = []
        for name in input_names:
            t = torch.from_numpy(np.ascontiguousarray(part.inputs[name]))
            out.append(t.to(float_dtype) if t.is_floating_point() else t)
        if kind == "distillation":
            assert teacher is not None
            target = torch.from_numpy(_teacher_outputs(teacher, part))
        elif kind == "cross_entropy+distillation":
            assert teacher is not None and part.labels is not None
            soft = _teacher_outputs(teacher, part).reshape(len(part), -1)
            labels = part.labels.astype(np.float32) if labelled else np.full(len(part), -1, np.float32)
            target = torch.from_numpy(np.concatenate([labels[:, None], soft], axis=1))
        elif kind == "cross_entropy":
            target = torch.from_numpy(np.ascontiguousarray(part.labels, dtype=np.int64))
        else:
            target = torch.from_numpy(np.ascontiguousarray(part.labels)).to(float_dtype)
        return [*out, target]

    prepared_train, prepared_val = tensors(train), tensors(val)
    logits = kind == "cross_entropy+distillation" or (kind == "distillation" and prepared_train[-1].ndim == 2)
    views: list[list[torch.Tensor]] = []
    if augmentation.enabled(augment, {n: train.inputs[n] for n in input_names}, teacher is not None):
        size = sum(train.inputs[n].nbytes for n in input_names)
        for index in range(min(augment_views, max(1, VIEW_BYTES // max(size, 1)))):
            shifted = augmentation.augmented_copy({n: train.inputs[n] for n in input_names}, seed + 7919 * (index + 1))
            views.append(tensors(SampleData(shifted, train.labels), labelled=False))
    return Prepared(prepared_train, prepared_val, kind, logits, distill_weight, temperature, tuple(views))


def compute_loss(data: Prepared, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The run's loss (mean over the batch), computed in fp32 whatever the autocast dtype."""
    import torch.nn.functional as F

    output = output.float()
    temperature = data.temperature
    if data.loss == "cross_entropy":
        return F.cross_entropy(output, target)
    if data.loss == "cross_entropy+distillation":
        labels = target[:, 0].long()
        labelled = (labels >= 0).float()  # augmented samples (-1) learn from the teacher alone
        hard = F.cross_entropy(output, labels.clamp(min=0), reduction="none") * labelled
        student = F.log_softmax(output / temperature, dim=-1)
        soft = F.log_softmax(target[:, 1:].float() / temperature, dim=-1)
        distill = F.kl_div(student, soft, reduction="none", log_target=True).sum(-1) * temperature**2
        return ((1 - data.distill_weight) * hard + data.distill_weight * distill).mean()
    if output.shape != target.shape and output.numel() == target.numel():
        output = output.reshape(target.shape)
    if data.loss == "distillation" and data.logits:
        student = F.log_softmax(output / temperature, dim=-1)
        soft = F.log_softmax(target.float() / temperature, dim=-1)
        return F.kl_div(student, soft, reduction="batchmean", log_target=True) * temperature**2
    return F.mse_loss(output, target.float())


def labels_of(data: Prepared, target: torch.Tensor) -> torch.Tensor:
    """The class labels in a classification target."""
    return target[:, 0].long() if data.loss == "cross_entropy+distillation" else target


def check_output(module: torch.nn.Module, data: Prepared, device: str) -> None:
    """One forward on two samples: the model runs and its output fits the targets."""
    import torch

    batch = [t[:2].to(device) for t in data.train]
    try:
        with torch.no_grad():
            output = module(*batch[:-1])
    except Exception as exc:
        raise PassFailed(f"the model's forward failed: {' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(output, torch.Tensor):
        raise PassFailed(f"the model must return one tensor for fine-tuning, got {type(output).__name__}")
    target = batch[-1]
    if data.classifies:
        classes = output.shape[-1] if output.ndim == 2 else 0
        labels = labels_of(data, data.train[-1])
        if classes == 0 or int(labels.min()) < 0 or int(labels.max()) >= classes:
            shape = tuple(output.shape)
            raise InvalidData(f"integer labels need 2-D logits with a column per class; the model outputs {shape}")
    elif output.numel() != target.numel():
        got, want = tuple(output.shape[1:]), tuple(target.shape[1:])
        raise InvalidData(f"the model outputs {got} per sample but the targets are {want}")


def make_optimizer(params: Iterator[Any], config: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """The configured torch optimizer."""
    import torch

    wd = config.weight_decay
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd, momentum=config.momentum)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=config.momentum)


def autocast(device: str, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for bf16 / fp16, a no-op for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def loader(data: Prepared, batch_size: int, seed: int, device: str, dist: Dist) -> Any:
    """Shuffled training batches: this rank's share of each global batch."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    dataset: Any = augmentation.EpochData(data.train, data.views)  # map-style: __len__ and __getitem__
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    cuda = torch.device(device).type == "cuda"
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=generator, pin_memory=cuda, drop_last=False
    )


def _evaluate(model: Any, data: Prepared, device: str, dist: Dist) -> tuple[float, float, float]:
    """(loss sum, sample count, correct count) over this rank's share of the validation set."""
    import torch

    model.eval()
    loss_sum = correct = 0.0
    count = 0
    indices = torch.arange(dist.rank, len(data.val[0]), dist.world)
    with torch.no_grad():
        for chunk in indices.split(256):
            batch = [t[chunk].to(device) for t in data.val]
            output = model(*batch[:-1])
            loss_sum += float(compute_loss(data, output, batch[-1])) * len(chunk)
            count += len(chunk)
            if data.classifies:
                correct += float((output.argmax(-1) == labels_of(data, batch[-1])).sum())
    return loss_sum, count, correct


def run(
    module: torch.nn.Module,
    data: Prepared,
    config: FinetuneConfig,
    *,
    lr: float,
    batch_size: int,
    precision: Precision,
    device: str,
    deadline: float | None,
    seed: int,
    dist: Dist = SINGLE,
) -> RunOutcome:
    """Train ``module`` in place for up to ``config.epochs`` epochs with early stopping.

    Raises :class:`NonFinite` when the (all-reduced) loss is not finite; on return the module
    holds the best epoch's weights when ``restore_best_weights`` is set.
    """
    import torch

    started = time.monotonic()
    torch.manual_seed(seed)
    model: Any = module
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        cuda = torch.device(device).type == "cuda"
        model = DistributedDataParallel(module, device_ids=[torch.device(device)] if cuda else None)
    optimizer = make_optimizer(model.parameters(), config, lr)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    stopper = EarlyStopping(config.monitor, config.patience, config.min_delta, config.mode, config.restore_best_weights)
    plateau = None
    if config.reduce_lr_patience is not None:  # Keras's ReduceLROnPlateau on the monitored value
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=stopper.mode, factor=config.reduce_lr_factor, patience=config.reduce_lr_patience
        )
    batches = loader(data, max(1, batch_size // dist.world), seed, device, dist)
    history: list[EpochRecord] = []
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.monotonic()
        batches.sampler.set_epoch(epoch)
        batches.dataset.set_epoch(epoch)
        model.train()
        train_sum = torch.zeros((), device=device)
        train_count = 0
        for batch in batches:
            batch = [t.to(device, non_blocking=True) for t in batch]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                output = model(*batch[:-1])
            loss = compute_loss(data, output, batch[-1])
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            train_sum += loss.detach() * len(batch[-1])
            train_count += len(batch[-1])
        val_sum, val_count, correct = _evaluate(model, data, device, dist)
        stats = torch.tensor([float(train_sum), train_count, val_sum, val_count, correct], dtype=torch.float64)
        if dist.world > 1:
            import torch.distributed as td

            stats = stats.to(device)
            td.all_reduce(stats)
            stats = stats.cpu()
        train_loss, val_loss = float(stats[0] / stats[1]), float(stats[2] / stats[3])
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise NonFinite(epoch)
        accuracy = float(stats[4] / stats[3]) if data.classifies else None
        seconds = time.monotonic() - epoch_start
        history.append(
            EpochRecord(epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_accuracy=accuracy, seconds=seconds)
        )
        logs = {"train_loss": train_loss, "val_loss": val_loss}
        if accuracy is not None:
            logs["val_accuracy"] = accuracy
        if stopper.update(epoch, logs, module.state_dict):
            break
        if plateau is not None:
            plateau.step(logs[config.monitor])
        mean_epoch = (time.monotonic() - started) / epoch
        if agree(deadline is not None and time.monotonic() + mean_epoch > deadline, dist, device):
            stopper.stopped_epoch = epoch
            break
    best_epoch = stopper.best_epoch or history[-1].epoch
    best_state = stopper.best_state()
    restored = best_state is not None and best_epoch != history[-1].epoch
    if best_state is not None and restored:
        module.load_state_dict(best_state)
    return RunOutcome(
        history=history,
        best_epoch=best_epoch,
        stopped_epoch=stopper.stopped_epoch,
        restored_best=restored,
        best_val_loss=history[best_epoch - 1].val_loss,
        seconds=time.monotonic() - started,
    )
