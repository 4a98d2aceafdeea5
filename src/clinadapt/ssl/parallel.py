"""What the pre-training loop does differently as one of several processes (torchrun).

The processes share one checkpoint, which process 0 reads and hands to the others (so several
nodes need no shared ``--out``), keep their own random state (dropout and drop-path differ per
image, as in one process), and stop together.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clinadapt.distributed import World, sum_over
from clinadapt.errors import ConfigError
from clinadapt.ssl import checkpoint as ckpt


def my_places(batch_size: int, w: World) -> np.ndarray:
    """The places of a global batch of ``batch_size`` images this process trains on."""
    return np.arange(batch_size)[w.rank :: w.size]


def check_batch(batch_size: int, w: World) -> None:
    """ConfigError when a global batch cannot give every process at least one image."""
    if batch_size < w.size:
        raise ConfigError(
            f"batch size {batch_size} is smaller than the {w.size} processes; every process "
            f"needs an image of each batch: use --batch-size {w.size} or more, or fewer processes"
        )


def read_state(path: Path, w: World) -> dict[str, Any] | None:
    """The checkpoint at ``path`` as process 0 reads it (None: there is none), in every process;
    process 0's error (an unreadable file) is raised in all of them."""
    if not w.active:
        return ckpt.load_state(path) if path.is_file() else None
    box: list[Any] = [None]
    if w.main:
        try:
            box[0] = ckpt.load_state(path) if path.is_file() else None
        except ConfigError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ConfigError(box[0])
    return box[0]


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, Python (and CUDA) random states, as tensors and plain values
    (so the checkpoint loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def process_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of process ``rank`` > 0 (process 0 keeps the run's own stream)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint32)[0])


def rng_states(w: World) -> dict[str, Any]:
    """The random state of every process, for the checkpoint: ``rng`` (process 0's, what one
    process restores) and, with several, ``rng_by_process``. Every process must call it."""
    mine = rng_state()
    if not w.active:
        return {"rng": mine}
    states: list[Any] = [None] * w.size
    dist.all_gather_object(states, mine)
    return {"rng": states[0], "rng_by_process": states}


def restore_rng(state: dict[str, Any], w: World, seed: int) -> None:
    """Each process takes back its own random state; a process the checkpoint had none for
    (the run resumes with more processes) starts from its own seed."""
    saved = state.get("rng_by_process") or [state["rng"]]
    if w.rank < len(saved):
        set_rng_state(saved[w.rank])
    else:
        torch.manual_seed(process_seed(seed, w.rank))


def stop_together(stop: bool, w: World) -> bool:
    """Process 0's decision (its clock ran out), taken by all."""
    return stop if not w.active else sum_over(float(stop and w.main)) > 0
