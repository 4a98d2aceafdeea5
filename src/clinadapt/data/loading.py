"""Batches of a dataset, decoded in worker processes when its images are read from files.

Decoding PNG, JPEG, DICOM or NIfTI files in the training process leaves a GPU waiting. Here each
batch is one item of a torch ``DataLoader``: workers decode and preprocess whole batches in
parallel, in order, with pinned memory for a CUDA device. A batch is built by the same function
with or without workers, so the results are identical.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clinadapt.errors import DataError

if TYPE_CHECKING:
    from clinadapt.data.base import ClinicalDataset

Batch = tuple[torch.Tensor, torch.Tensor, np.ndarray]
MAX_AUTO_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_workers(ds: ClinicalDataset) -> int:
    """Worker processes worth starting for ``ds``: none for images held in memory, else up to
    ``MAX_AUTO_WORKERS`` (one per CPU). A daemonic process (e.g. a pool worker) cannot start
    any."""
    if not ds.source.reads_files or multiprocessing.current_process().daemon:
        return 0
    return min(MAX_AUTO_WORKERS, available_cpus())


def batch_chunks(
    n: int, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> list[np.ndarray]:
    """The positions of each batch of an epoch over ``n`` images: in order, or a permutation
    seeded by ``seed``, cut into ``batch_size`` slices (the last one short unless dropped)."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    chunks = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


def load_batch(
    ds: ClinicalDataset, preprocess: Callable[[list[np.ndarray]], torch.Tensor], pos: np.ndarray
) -> Batch:
    """Images at positions ``pos`` through ``preprocess``, with their labels and positions."""
    imgs = [ds.image(int(i)) for i in pos]
    if len({im.shape for im in imgs}) == 1:
        x = preprocess(imgs)
    else:  # mixed sizes: bring each to the model's size alone
        x = torch.cat([preprocess([im]) for im in imgs])
    return x, torch.as_tensor(ds.labels[pos]), pos


class BatchSet(torch.utils.data.Dataset):
    """Item ``j`` is the ``j``-th batch; a ``DataError`` comes back as a value, so the main
    process raises it with its own message (not wrapped in a worker traceback)."""

    def __init__(
        self,
        ds: ClinicalDataset,
        preprocess: Callable[[list[np.ndarray]], torch.Tensor],
        chunks: Sequence[np.ndarray],
    ) -> None:
        self.ds, self.preprocess, self.chunks = ds, preprocess, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> Batch | DataError:
        try:
            return load_batch(self.ds, self.preprocess, self.chunks[j])
        except DataError as e:
            return e


def _as_is(item: Any) -> Any:
    return item


def iter_batches(
    ds: ClinicalDataset,
    preprocess: Callable[[list[np.ndarray]], torch.Tensor],
    chunks: Sequence[np.ndarray],
    workers: int,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Yield the batches of ``chunks`` in order: in this process when ``workers`` is 0 and
    nothing is pinned, else through a ``DataLoader`` with that many worker processes."""
    if workers == 0 and not pin_memory:
        for pos in chunks:
            yield load_batch(ds, preprocess, pos)
        return
    loader = torch.utils.data.DataLoader(
        BatchSet(ds, preprocess, chunks),
        batch_size=None,  # each item is already a batch
        shuffle=False,
        num_workers=min(workers, len(chunks)),
        collate_fn=_as_is,
        pin_memory=pin_memory and torch.cuda.is_available(),
    )
    for item in loader:
        if isinstance(item, DataError):
            raise item
        yield item
