"""Data-parallel fine-tuning: DistributedDataParallel in processes this code spawns itself.

torch.multiprocessing starts ``workers`` processes (spawn: no inherited CUDA state); they meet
through a ``file://`` store in a private temporary folder (no port to race for) on gloo (CPU) or
nccl (one CUDA device per rank). Each rank runs the same search and runs as a single process
would (:func:`optimizer.training.search.run_search`) with ``batch_size // workers`` samples per
step, so the global batch and its samples equal the single-process ones; losses and stop
decisions are all-reduced so every rank stops together. Rank 0 writes the final state dict
(``torch.save``, read back with ``weights_only=True``) and the report (JSON) to the folder.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import InvalidConfig, InvalidData, OptimizerError, PassFailed, first_line

if TYPE_CHECKING:
    import torch

    from optimizer.training.loop import Precision, Prepared
    from optimizer.training.search import FinetuneConfig, TrainingReport


@dataclass(frozen=True)
class Dist:
    """This process's place in a DDP group (world 1: no group)."""

    rank: int = 0
    world: int = 1


SINGLE = Dist()


def agree(flag: bool, dist: Dist, device: str) -> bool:
    """True on every rank when it is True on any rank (ranks stop together)."""
    if dist.world == 1:
        return flag
    import torch
    import torch.distributed as td

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    td.all_reduce(value, op=td.ReduceOp.MAX)
    return bool(value.item() > 0)


_ERRORS: dict[str, type[OptimizerError]] = {cls.__name__: cls for cls in (PassFailed, InvalidConfig, InvalidData)}


def fine_tune_distributed(
    module: torch.nn.Module,
    data: Prepared,
    config: FinetuneConfig,
    *,
    device: str,
    workers: int,
    precision: Precision,
    note: str | None,
    deadline: float | None,
    seed: int,
) -> TrainingReport:
    """Run the search on ``workers`` DDP processes; ``module`` ends with rank 0's final weights."""
    import torch
    import torch.multiprocessing as mp

    from optimizer.training.search import TrainingReport

    cuda = torch.device(device).type == "cuda"
    module.to("cpu")
    try:
        # Plain pickle bytes, not the module itself: torch.multiprocessing would share the
        # parameters' storage between the ranks, and every rank would step the same weights.
        payload = pickle.dumps(module)
    except Exception as exc:
        module.to(device)
        raise PassFailed(f"workers={workers} needs a picklable model: {first_line(exc)}") from exc
    with tempfile.TemporaryDirectory(prefix="slimserve-ddp-") as tmp:
        folder = Path(tmp)
        options = {"precision": precision, "note": note, "deadline": deadline, "seed": seed}
        # onnx2torch modules unpickle only where its torchvision import works: the bridge's shim.
        shim = "onnx2torch" in sys.modules
        args = (workers, str(folder), payload, data, config, cuda, shim, options)
        try:
            mp.start_processes(_worker, args=args, nprocs=workers, join=True, start_method="spawn")
        except Exception as exc:
            module.to(device)
            raise _translate(folder, exc) from None
        state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
        module.load_state_dict(state)
        report = TrainingReport.model_validate_json((folder / "report.json").read_text())
    module.to(device)
    devices = [f"cuda:{rank}" for rank in range(workers)] if cuda else [f"cpu x{workers} (gloo)"]
    return report.model_copy(update={"devices": devices})


def _translate(folder: Path, exc: BaseException) -> OptimizerError:
    """The error a rank wrote down, else a one-line PassFailed for the crash."""
    for path in sorted(folder.glob("error-*.json")):
        try:
            saved = json.loads(path.read_text())
            return _ERRORS.get(saved["type"], PassFailed)(saved["message"])
        except (OSError, ValueError, KeyError):
            continue
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return PassFailed(f"distributed training failed: {first_line(Exception(reason), folder)}")


def _worker(
    rank: int,
    world: int,
    folder: str,
    payload: bytes,
    data: Prepared,
    config: FinetuneConfig,
    cuda: bool,
    shim: bool,
    options: dict[str, Any],
) -> None:
    """One rank: join the group, run the search, and (rank 0) write the weights and report."""
    import torch
    import torch.distributed as td

    from optimizer.training.search import run_search

    out = Path(folder)
    try:
        if shim:
            from optimizer.torchbridge import import_onnx2torch

            import_onnx2torch()
        if cuda:
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        else:
            device = "cpu"
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        td.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world
        )
        try:
            module = pickle.loads(payload).to(device)  # the parent's own bytes of its module
            report = run_search(module, data, config, device=device, dist=Dist(rank, world), **options)
            if rank == 0:
                torch.save(module.state_dict(), out / "state.tmp")
                os.replace(out / "state.tmp", out / "state.pt")
                (out / "report.json").write_text(report.model_dump_json())
        finally:
            td.destroy_process_group()
    except OptimizerError as exc:
        (out / f"error-{rank}.json").write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise
