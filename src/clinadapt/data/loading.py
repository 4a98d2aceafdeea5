"""Batches of a dataset, decoded in worker processes when its images are read from files.

Decoding PNG, JPEG, DICOM or NIfTI files in the training process leaves a GPU waiting. Here each
batch is one item of a torch ``DataLoader``: workers decode and preprocess whole batches in
parallel, in order, with pinned memory for a CUDA device. A batch is built by the same function
with or without workers, so the results are identical.

Given the device the model runs on, workers only stack uint8 images (``Preprocessing.host_stage``)
and the float work runs on that device (``Preprocessing.device_stage``): a quarter of the bytes
through shared and pinned memory and over the bus, and no float work on the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from clinadapt.errors import DataError

if TYPE_CHECKING:
    from clinadapt.data.base import ClinicalDataset

Batch = tuple[torch.Tensor, torch.Tensor, np.ndarray]
T = TypeVar("T")
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


class WholePreprocess:
    """A one-stage ``preprocess`` as a host stage: a batch of mixed sizes goes image by image."""

    def __init__(self, preprocess: Callable[[list[np.ndarray]], torch.Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, imgs: list[np.ndarray]) -> torch.Tensor:
        if len({im.shape for im in imgs}) == 1:
            return self.preprocess(imgs)
        return torch.cat([self.preprocess([im]) for im in imgs])  # each to the model's size


def stages(
    preprocess: Callable[[list[np.ndarray]], torch.Tensor], device: str | torch.device | None
) -> tuple[Callable[[list[np.ndarray]], Any], Callable[[Any], torch.Tensor]]:
    """``preprocess`` cut into what workers run and what the main process runs on ``device``.

    A :class:`~clinadapt.models.preprocessing.Preprocessing` with a device: uint8 host batches,
    the float work on the device. Without a device, or for another callable (volumes), all of
    it on the host, then a copy."""
    from clinadapt.models.preprocessing import Preprocessing

    if device is not None and isinstance(preprocess, Preprocessing):
        return preprocess.host_stage, functools.partial(preprocess.device_stage, device=device)
    if device is None:
        return WholePreprocess(preprocess), _as_is
    return WholePreprocess(preprocess), functools.partial(_copy_to, device=device)


def preprocess_on(
    preprocess: Callable[[list[np.ndarray]], torch.Tensor],
    images: list[np.ndarray],
    device: str | torch.device,
) -> torch.Tensor:
    """``images`` through ``preprocess`` onto ``device``, in two stages where it has them."""
    host, finish = stages(preprocess, device)
    return finish(host(images))


def _copy_to(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


def load_batch(
    ds: ClinicalDataset, host: Callable[[list[np.ndarray]], Any], pos: np.ndarray
) -> tuple[Any, torch.Tensor, np.ndarray]:
    """Images at positions ``pos`` through ``host``, with their labels and positions."""
    imgs = [ds.image(int(i)) for i in pos]
    return host(imgs), torch.as_tensor(ds.labels[pos]), pos


class BatchSet(torch.utils.data.Dataset):
    """Item ``pos`` (an array of positions) is that batch, loaded; a ``DataError`` comes back as
    a value, so the main process raises it with its own message (not wrapped in a worker
    traceback)."""

    def __init__(self, ds: ClinicalDataset, host: Callable[[list[np.ndarray]], Any]) -> None:
        self.ds, self.host = ds, host

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, pos: np.ndarray) -> Any:
        try:
            return load_batch(self.ds, self.host, pos)
        except DataError as e:
            return e


class ChunkSampler(torch.utils.data.Sampler):
    """The positions of each batch of a pass, in order; ``chunks`` is set anew for each pass."""

    def __init__(self, chunks: Sequence[np.ndarray]) -> None:
        self.chunks = list(chunks)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class KeptLoader:
    """A ``DataLoader`` whose workers outlive a pass (``persistent_workers``), with what it was
    built for (held, so that the ids in its key stay theirs)."""

    def __init__(self, ds: Any, preprocess: Any, loader: Any, sampler: ChunkSampler) -> None:
        self.ds, self.preprocess, self.loader, self.sampler = ds, preprocess, loader, sampler

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)  # torch keeps the persistent iterator here
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None


_KEPT: contextvars.ContextVar[dict[tuple, KeptLoader] | None] = contextvars.ContextVar(
    "kept_loaders", default=None
)


@contextlib.contextmanager
def keep_workers() -> Iterator[None]:
    """Inside, worker processes stay up from one pass over a dataset to the next (same dataset,
    preprocessing, workers and pinning): the epochs of a training loop and its validation
    passes start their workers once, not once per pass. All of them stop on leaving.

    Starting workers costs a fork each and the first batch comes late (measured on a 2-core CPU:
    0.4 s with 2 workers, 0.65 s with 4, per pass). The datasets must not change inside."""
    if _KEPT.get() is not None:  # nested: the outer one owns the workers
        yield
        return
    kept: dict[tuple, KeptLoader] = {}
    token = _KEPT.set(kept)
    try:
        yield
    finally:
        _KEPT.reset(token)
        for entry in kept.values():
            entry.close()


def _loader(
    ds: ClinicalDataset,
    preprocess: Any,
    host: Callable[[list[np.ndarray]], Any],
    chunks: Sequence[np.ndarray],
    workers: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    kept = _KEPT.get()
    persistent = kept is not None and workers > 0
    key = (id(ds), id(preprocess), type(host).__name__, workers, pin_memory)
    if persistent and key in kept:
        kept[key].sampler.chunks = list(chunks)
        return kept[key].loader
    sampler = ChunkSampler(chunks)
    loader = torch.utils.data.DataLoader(
        BatchSet(ds, host),
        batch_size=None,  # each item is already a batch
        sampler=sampler,
        num_workers=min(workers, len(chunks)),
        collate_fn=_as_is,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent,
    )
    if persistent:
        kept[key] = KeptLoader(ds, preprocess, loader, sampler)
    return loader


def _as_is(item: Any) -> Any:
    return item


def ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` in order, produced by a background thread up to ``depth`` ahead.

    Without worker processes, a training loop that reads its loss back waits for the GPU, then
    builds the next batch while the GPU waits for it. Built by a thread, the next batches are
    ready (stacked, pinned) when the GPU is done. An exception raised by ``items`` is raised
    here, in its place; leaving the loop early stops the thread."""
    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=produce, name="clinadapt-batches", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _pinned(item: tuple[Any, torch.Tensor, np.ndarray]) -> tuple[Any, torch.Tensor, np.ndarray]:
    x, y, pos = item
    return x.pin_memory(), y.pin_memory(), pos


def iter_batches(
    ds: ClinicalDataset,
    preprocess: Callable[[list[np.ndarray]], torch.Tensor],
    chunks: Sequence[np.ndarray],
    workers: int,
    pin_memory: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[Batch]:
    """Yield the batches of ``chunks`` in order: through a ``DataLoader`` with ``workers``
    worker processes (kept for the next pass inside :func:`keep_workers`), else in this
    process, by a thread one batch ahead when the batches are pinned for a GPU (:func:`ahead`).

    With a ``device``, the images come out on it, preprocessed there (see :func:`stages`)."""
    host, finish = stages(preprocess, device)
    items: Iterable[Any]
    if workers > 0:
        items = _loader(ds, preprocess, host, chunks, workers, pin_memory)
    else:
        items = (load_batch(ds, host, pos) for pos in chunks)
        if pin_memory:
            items = ahead(map(_pinned, items) if torch.cuda.is_available() else items)
    for item in items:
        if isinstance(item, DataError):
            raise item
        x, y, pos = item
        yield finish(x), y, pos
