"""Data-parallel training across processes started by ``torchrun``.

``torchrun --nproc-per-node N -m clinadapt.cli run ...`` starts N processes; each joins the
process group (gloo on the CPU, NCCL on CUDA, one GPU per process: ``cuda:$LOCAL_RANK``).
Training splits every global batch (the same batches, in the same order, as one process draws)
between the processes: process r takes positions r, r+N, ... of it, which is what
``torch.utils.data.DistributedSampler`` does to a whole epoch, kept inside each batch so the
global batches stay those of one process. After the backward pass the gradients are summed
over the processes (one all-reduce of a flat buffer; each process weighted its loss by its
share of the batch), which is the average DistributedDataParallel computes, also when the
last batch splits unevenly or leaves a process empty. So N processes train the model one
process would, up to the order of floating-point sums. BatchNorm layers normalise with the
statistics of each process's part of the batch (as DistributedDataParallel without
SyncBatchNorm); the running statistics of process 0 are kept.

Only process 0 writes records, checkpoints, weights and the fit cache, and only it prints.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from clinadapt.data.loading import Batch, auto_workers, batch_chunks, iter_batches
from clinadapt.errors import ConfigError

if TYPE_CHECKING:
    from clinadapt.data.base import ClinicalDataset


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Whether this process writes and prints (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there is more than one process."""
        return self.size > 1

    def describe(self) -> dict[str, object]:
        """For the record: how many processes trained, and how they talked."""
        return {"processes": self.size, "backend": self.backend}


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def one_process_only(what: str, why: str) -> None:
    """ConfigError when ``what`` was started as one of several processes (it would repeat
    the same work in each, or split it wrongly)."""
    if launched():
        raise ConfigError(f"{what} runs as one process ({why}); start it without torchrun")


def world() -> World:
    """The process group this process belongs to (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", "0")),
        dist.get_backend(),
    )


def init(device: str) -> str:
    """Join the process group the launcher describes; return this process's device.

    Without a launcher (``WORLD_SIZE`` unset or 1) nothing happens. With one, a CUDA device
    becomes ``cuda:$LOCAL_RANK`` (one GPU per process) with NCCL; any other device uses gloo.
    Processes other than rank 0 stop printing.
    """
    if not launched():
        return device
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local} on this node has no GPU of its own ({torch.cuda.device_count()} "
                "visible); start at most that many processes per node (--nproc-per-node)"
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device != "cpu":
        raise ConfigError(
            f"several processes train on the CPU (gloo) or on CUDA GPUs (NCCL), not on {device!r}"
        )
    if not dist.is_initialized():
        # CUDA tensors over NCCL, CPU tensors (losses, features trained on the CPU) over gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
        atexit.register(_leave)
    if dist.get_rank() != 0:
        from clinadapt.progress import set_quiet

        set_quiet(True)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def my_part(positions: np.ndarray, w: World | None = None) -> np.ndarray:
    """This process's positions of a global batch: every N-th, starting at its rank."""
    w = w or world()
    return positions[w.rank :: w.size]


def split_batches(
    ds: ClinicalDataset,
    preprocess: Callable[[list[np.ndarray]], torch.Tensor],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    workers: int | None = None,
    pin_memory: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[tuple[Batch | None, np.ndarray]]:
    """The batches one process would draw (:func:`batch_chunks`), each as ``(this process's
    part, loaded, or None when it holds no image of it; the whole batch's positions)``; images
    preprocessed on ``device`` when given (see :func:`clinadapt.data.loading.iter_batches`)."""
    w = world()
    chunks = batch_chunks(len(ds), batch_size, shuffle=shuffle, seed=seed)
    parts = [my_part(c, w) for c in chunks]
    n = auto_workers(ds) if workers is None else workers
    loaded = iter_batches(ds, preprocess, [p for p in parts if len(p)], n, pin_memory, device)
    for chunk, part in zip(chunks, parts, strict=True):
        yield (next(loaded) if len(part) else None), chunk


def sharded_step(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
) -> float:
    """Backward pass of one global ``batch`` of indices (into tensors every process holds):
    this process's part of it, weighted by its share, gradients summed over the processes.
    Returns the global batch's mean loss (non-finite: nothing was backpropagated here)."""
    w = world()
    value = 0.0
    part = batch[w.rank :: w.size]
    if len(part):
        loss = loss_of(part)
        if w.active:
            loss = loss * (len(part) / len(batch))
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
    sum_gradients(params)
    return sum_over(value)


def sum_over(value: float | torch.Tensor, device: str | torch.device = "cpu") -> float:
    """The sum of ``value`` over the processes (``value`` itself for one process)."""
    if not world().active:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1)
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the processes, in one flat all-reduce.

    A parameter with a gradient in some process (not in one that had no image in the batch)
    counts as zero where it has none and gets the sum everywhere; one without a gradient in
    any process keeps none, so the optimiser skips it as it would in one process.
    """
    if not world().active or not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has)
    used = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
    if not used:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in used:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Give every process rank 0's values of ``tensors`` (in place)."""
    if not world().active:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every process rank 0's parameters and buffers: the same start, and (after each
    epoch) the same BatchNorm running statistics, so validation agrees everywhere."""
    broadcast_tensors([*module.parameters(), *module.buffers()])


__all__ = [
    "World",
    "broadcast_module",
    "broadcast_tensors",
    "init",
    "launched",
    "my_part",
    "one_process_only",
    "sharded_step",
    "split_batches",
    "sum_gradients",
    "sum_over",
    "world",
]
