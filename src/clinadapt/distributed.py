"""Data-parallel training across processes started by ``torchrun``.

``torchrun --nproc-per-node N -m clinadapt.cli run ...`` starts N processes; each joins the
process group (gloo on the CPU, NCCL on CUDA, one GPU per process: ``cuda:$LOCAL_RANK``).
Training draws the global batches one process draws (:class:`ShardSampler`, a
``DistributedSampler``): process r loads positions r, r+N, ... of each. The trained module runs
inside ``DistributedDataParallel`` (:func:`wrap`), whose bucketed all-reduce of the gradients
overlaps the backward pass; each process weights its loss by its share of the global batch
(:func:`ddp_loss`), so DDP's average is the gradient of the global batch's mean loss, also when
the last batch splits unevenly or leaves a process without an image (:func:`idle_loss`). So N
processes train the model one process would, up to the order of floating-point sums, except
that BatchNorm layers normalise with each process's part of the batch unless they are made
global (see :func:`wrap`).

Only process 0 writes records, checkpoints, weights and the fit cache, and only it prints.
"""

from __future__ import annotations

import atexit
import gc
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

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
        return {
            "processes": self.size,
            "backend": self.backend,
            "wrapper": "DistributedDataParallel",
        }


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
        # DistributedDataParallel wrappers no longer in use but held in reference cycles go
        # first, while the group is whole: one destroyed during interpreter teardown can abort
        # the process (gloo, torch 2.14: "terminate called without an active exception")
        gc.collect()
        dist.destroy_process_group()


class ShardSampler(DistributedSampler):
    """The batches one process draws, each split between the processes.

    A ``torch.utils.data.distributed.DistributedSampler`` whose epoch is the global batches of
    :func:`batch_chunks` (``batch_size`` positions each, shuffled with ``seed + epoch``; call
    :meth:`set_epoch` before each epoch), of which this process takes positions
    ``rank, rank + N, ...`` of every batch: the rule DistributedSampler applies to a whole
    epoch, kept within each batch so that N processes step on the global batches one process
    draws. Unlike DistributedSampler it pads nothing: a short last batch leaves the processes
    with parts of unequal size, or none (they still join the step: :func:`load_shards`).
    Iterating gives this process's positions; :meth:`parts` gives them batch by batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        w = world()
        super().__init__(
            range(n),  # type: ignore[arg-type]  # a sized stand-in: positions 0..n-1
            num_replicas=w.size if num_replicas is None else num_replicas,
            rank=w.rank if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
        )
        self.n, self.batch_size = n, batch_size

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's batches: the positions one process would train on, batch by batch."""
        seed = self.seed + self.epoch
        return batch_chunks(self.n, self.batch_size, shuffle=self.shuffle, seed=seed)

    def shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This epoch's ``(this process's part, the whole batch)`` pairs (a part may be empty)."""
        return [(b[self.rank :: self.num_replicas], b) for b in self.global_batches()]

    def parts(self) -> list[np.ndarray]:
        """This process's part of each of this epoch's batches (some may be empty)."""
        return [part for part, _ in self.shards()]

    def __iter__(self) -> Iterator[int]:
        for part in self.parts():
            yield from part.tolist()

    def __len__(self) -> int:
        full, last = divmod(self.n, self.batch_size)
        mine = len(range(self.rank, self.batch_size, self.num_replicas))
        return full * mine + len(range(self.rank, last, self.num_replicas))


def load_shards(
    ds: ClinicalDataset,
    preprocess: Callable[[list[np.ndarray]], torch.Tensor],
    sampler: ShardSampler,
    *,
    workers: int | None = None,
    pin_memory: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """This epoch's batches of ``sampler`` as ``(this process's part, loaded; the whole batch's
    positions)``. Each process loads only its part. A process with no image in a (short, last)
    batch gets the batch's first image with no position (``pos`` empty): it forwards that image
    and backpropagates :func:`idle_loss`, so that it still takes part in the step (a forward pass
    on zero images would fail in many models). Images are preprocessed on ``device`` when given
    (see :func:`clinadapt.data.loading.iter_batches`)."""
    shards = sampler.shards()
    wanted = [part if len(part) else batch[:1] for part, batch in shards]
    n = auto_workers(ds) if workers is None else workers
    loaded = iter_batches(ds, preprocess, wanted, n, pin_memory, device)
    for (part, batch), (x, y, pos) in zip(shards, loaded, strict=True):
        yield (x, y, pos if len(part) else part), batch


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` inside ``DistributedDataParallel`` when several processes train; else itself.

    Train through the returned module (its forward), step the optimiser on ``module``'s
    parameters. DDP gives every process rank 0's parameters and buffers when it wraps (the same
    start), and all-reduces the gradients of the trainable parameters (``requires_grad``; the
    frozen rest is not DDP's concern) in buckets while the backward pass runs, then divides
    them by N: each process weights its loss with :func:`ddp_loss`. On a CUDA device it uses
    that GPU (``device_ids=[local_rank]``). ``static_graph=True``: the same parameters take part
    in every step, so DDP finds, in the first step, trainable parameters that the loss does
    not reach (a head left out, a prompt a model does not use) and all-reduces without them
    from then on, at no cost per step (``find_unused_parameters=True`` would search the graph
    at every step). BatchNorm: DDP broadcasts rank 0's buffers (running statistics) before each
    forward pass (``broadcast_buffers``), and each process normalises with the statistics of its
    own part of the batch, not the global batch's as one process does. torch's ``SyncBatchNorm``
    computes global statistics on GPUs only; ``clinadapt.ssl.collective.global_batchnorm``
    does on the CPU (gloo) too (finetune's ``sync_batchnorm`` option applies it before wrapping).
    """
    w = world()
    if not w.active:
        return module
    trained = [p for p in module.parameters() if p.requires_grad]
    if not trained:
        raise ConfigError(
            f"{type(module).__name__} has no trainable parameter for DistributedDataParallel"
        )
    device = trained[0].device
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        static_graph=True,
    )


def ddp_loss(loss: torch.Tensor, share: float) -> torch.Tensor:
    """What this process backpropagates through :func:`wrap`'s module: its part's mean
    ``loss`` times ``share``, its part's share of the global batch's mean loss (its images'
    fraction, or its share of the class weights), times N, since DDP divides the summed
    gradients by N. The result is the gradient of the global batch's mean loss, as in one
    process (where ``loss`` is returned as it is)."""
    w = world()
    return loss * (share * w.size) if w.active else loss


def idle_loss(output: torch.Tensor) -> torch.Tensor:
    """The loss of a process that holds no image of a global batch: zero, computed from the
    output of a forward pass through the wrapped module (of the batch's first image, which
    process 0 trains on), so that its backward pass joins DDP's all-reduce of the gradients
    (without it the other processes would wait) and adds nothing to them."""
    return output.sum() * 0.0


def backward_part(
    net: torch.nn.Module,
    inputs: torch.Tensor,
    part: np.ndarray,
    batch: np.ndarray,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """Forward and backward pass of this process's ``part`` (row indices) of the global
    ``batch`` of rows of ``inputs``, a tensor every process holds (e.g. cached features),
    through ``net`` (:func:`wrap`); ``loss_of(output, rows)`` is the mean loss of those rows.
    Returns the global batch's mean loss, in every process (non-finite: check it before
    stepping)."""
    idle = not len(part)
    rows = torch.as_tensor(batch[:1] if idle else part, dtype=torch.long, device=inputs.device)
    output = net(inputs[rows])
    if idle:  # no row of this (short, last) batch: join the step, adding nothing
        loss, share = idle_loss(output), 0.0
    else:
        loss, share = loss_of(output, rows), len(rows) / len(batch)
    ddp_loss(loss, share).backward()
    return sum_over(loss.item() * share)


def sum_over(value: float | torch.Tensor, device: str | torch.device = "cpu") -> float:
    """The sum of ``value`` over the processes (``value`` itself for one process)."""
    if not world().active:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1)
    dist.all_reduce(t)
    return float(t.item())


def decide(flag: bool) -> bool:
    """Rank 0's ``flag``, in every process (``flag`` itself in one process).

    For choices made on files that only rank 0 writes (has this run a record?): every process
    takes the branch rank 0 takes. Processes that branched apart would wait for each other in
    different collectives, or pair one run's steps with another's.
    """
    if not world().active:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.broadcast(t, src=0)  # CPU tensor: gloo, also beside NCCL
    return bool(t.item())


def everyone(flag: bool) -> bool:
    """Whether ``flag`` holds in every process (``flag`` itself in one process): e.g. whether
    each of them could load a cached fit (one that could not makes all of them train)."""
    if not world().active:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a file the others
    read next); nothing in one process."""
    if world().active:
        dist.barrier()


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Give every process rank 0's values of ``tensors`` (in place)."""
    if not world().active:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


__all__ = [
    "ShardSampler",
    "World",
    "backward_part",
    "barrier",
    "broadcast_tensors",
    "ddp_loss",
    "decide",
    "everyone",
    "idle_loss",
    "init",
    "launched",
    "load_shards",
    "one_process_only",
    "sum_over",
    "world",
    "wrap",
]
