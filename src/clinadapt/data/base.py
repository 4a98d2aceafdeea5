"""The dataset every reader produces: images, labels, class names and per-image metadata."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from clinadapt.data.loading import auto_workers, batch_chunks, iter_batches
from clinadapt.errors import DataError

Task = Literal["multiclass", "binary", "multilabel", "segmentation"]
# The classification tasks; "segmentation" belongs to data.segmentation.SegmentationDataset.
TASKS: tuple[str, ...] = ("multiclass", "binary", "multilabel")
SEGMENTATION = "segmentation"
# Metadata keys with a meaning across the toolkit; readers may add others.
META_KEYS = ("split", "domain", "scanner", "sex", "age_group", "patient_id")


class ImageSource(abc.ABC):
    """Where pixels come from: ``load(i)`` returns a uint8 (H,W) or (H,W,C) array."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of images."""

    @abc.abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Decode image ``i`` as uint8 pixels."""

    def describe(self, i: int) -> str:
        """Name image ``i`` in error messages (a file path where there is one)."""
        return f"image #{i}"

    @property
    def reads_files(self) -> bool:
        """Whether ``load`` decodes files (worth worker processes; see ``data.loading``)."""
        return False

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A hash that changes whenever any image would decode differently."""


class ArraySource(ImageSource):
    """Images held in memory as one uint8 array (N,H,W) or (N,H,W,C)."""

    def __init__(self, array: np.ndarray, origin: str = "array") -> None:
        array = np.asarray(array)
        if array.ndim not in (3, 4):
            raise DataError(f"{origin}: images must be (N,H,W) or (N,H,W,C), got {array.shape}")
        if array.ndim == 4 and array.shape[-1] not in (1, 3, 4):
            raise DataError(
                f"{origin}: the last axis holds {array.shape[-1]} channels; expected 1, 3 or 4"
            )
        if array.dtype != np.uint8:
            raise DataError(f"{origin}: images must be uint8, got {array.dtype}")
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        self.array = array
        self.origin = origin
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.array)

    def load(self, i: int) -> np.ndarray:
        return self.array[i]

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256(str(self.array.shape).encode())
            h.update(np.ascontiguousarray(self.array).data)
            self._fp = h.hexdigest()
        return self._fp


class FileSource(ImageSource):
    """Images read lazily from files by ``reader(path) -> uint8 array``.

    A reader failure becomes a :class:`DataError` naming the file.
    """

    def __init__(self, paths: Sequence[str], reader: Callable[[str], np.ndarray]) -> None:
        self.paths = [str(p) for p in paths]
        self.reader = reader

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            img = self.reader(path)
        except DataError:
            raise
        except Exception as e:  # corrupt or unreadable: name the file
            raise DataError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e
        return check_image(img, path)

    def describe(self, i: int) -> str:
        return self.paths[i]

    @property
    def reads_files(self) -> bool:
        return True

    def fingerprint(self) -> str:
        return hash_files(hashlib.sha256(), self.paths).hexdigest()


def hash_files(h: Any, paths: Sequence[str]) -> Any:
    """Feed each file's path, size and modification time into the hash ``h``; return it."""
    import os

    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h


def check_image(img: np.ndarray, where: str) -> np.ndarray:
    """Validate a decoded image: uint8, (H,W) or (H,W,1|3|4), non-empty."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        raise DataError(
            f"{where}: unsupported image shape {img.shape}; expected (H,W) grey or (H,W,3) RGB"
        )
    if img.size == 0:
        raise DataError(f"{where}: the image is empty")
    if img.dtype != np.uint8:
        raise DataError(f"{where}: decoded pixels are {img.dtype}, expected uint8")
    return img


def integer_classes(
    present: list[int], where: str, notes: list[str]
) -> tuple[list[str], dict[int, int]]:
    """Classes of integer labels: the values present, in order; a note when they have gaps."""
    names = [str(v) for v in present]
    if present != list(range(len(present))):
        notes.append(
            f"{where}: integer labels {present} are the {len(present)} classes {names} "
            f"(indices 0..{len(present) - 1}); pass class_names= to name them or to keep "
            "classes that have no image"
        )
    return names, {v: j for j, v in enumerate(present)}


@dataclass(repr=False)
class ClinicalDataset:
    """Images with labels, class names, modality and per-image metadata (split, domain, ...).

    ``labels`` is (N,) int64 for single-label tasks and (N, K) {0,1} for multi-label ones.
    ``metadata`` maps keys such as ``split``, ``domain``, ``scanner``, ``sex``, ``age_group``
    and ``patient_id`` to (N,) string arrays.
    """

    name: str
    source: ImageSource
    labels: np.ndarray
    class_names: list[str]
    task: Task = "multiclass"
    modality: str = "unknown"
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    index: np.ndarray | None = None  # positions in ``source``; None means all of it
    # what a reader decided for the user (integer labels with gaps, a split it made, ...):
    # every record that uses the dataset says so
    notes: list[str] = field(default_factory=list)

    # Fields holding one row per image of the view: subset() and concat() carry them along.
    PER_IMAGE: ClassVar[tuple[str, ...]] = ("labels",)
    #: 2 for images, 3 for volumes (data.volume): models and corruptions must match it
    spatial_dims: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.source), dtype=np.int64)
        self.index = np.asarray(self.index, dtype=np.int64)
        n = len(self.index)
        if not self.class_names:
            raise DataError(f"{self.name}: no class names")
        self.labels = np.asarray(self.labels)
        if len(self.labels) != n:
            raise DataError(f"{self.name}: {len(self.labels)} labels for {n} images")
        self._check_labels()
        meta = {}
        for key, values in self.metadata.items():
            values = np.asarray(values).astype(str)
            if len(values) != n:
                raise DataError(
                    f"{self.name}: metadata {key!r} has {len(values)} values for {n} images"
                )
            meta[key] = values
        self.metadata = meta

    def _check_labels(self) -> None:
        """Validate ``labels`` for the task (subclasses with other tasks override this)."""
        if self.task not in TASKS:
            raise DataError(f"{self.name}: task must be one of {TASKS}, got {self.task!r}")
        n = len(self.index)
        k = len(self.class_names)
        if self.task == "multilabel":
            if self.labels.ndim != 2 or self.labels.shape[1] != k:
                raise DataError(
                    f"{self.name}: multi-label targets must be (N, {k}), got {self.labels.shape}"
                )
            self.labels = self.labels.astype(np.int64)
        else:
            if self.labels.ndim != 1:
                raise DataError(f"{self.name}: labels must be (N,), got {self.labels.shape}")
            self.labels = self.labels.astype(np.int64)
            if n and (self.labels.min() < 0 or self.labels.max() >= k):
                bad = self.labels[(self.labels < 0) | (self.labels >= k)][0]
                raise DataError(
                    f"{self.name}: label {int(bad)} is outside the {k} classes {self.class_names}"
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {len(self)} images, task={self.task!r}, "
            f"classes={self.class_names})"
        )

    # --- size and access ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image(self, i: int) -> np.ndarray:
        img = self.source.load(int(self.index[i]))
        return img if img.flags.writeable else img.copy()  # shared (cached) pixels stay intact

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.index[i]))

    def meta(self, key: str) -> np.ndarray:
        if key not in self.metadata:
            raise DataError(
                f"{self.name}: no metadata {key!r}; it has {sorted(self.metadata) or 'none'}"
            )
        return self.metadata[key]

    def has_meta(self, key: str) -> bool:
        return key in self.metadata

    # --- views -------------------------------------------------------------------------------
    def subset(
        self, positions: np.ndarray | Sequence[int], name: str | None = None
    ) -> ClinicalDataset:
        """A view on some of this dataset's images (positions relative to this view)."""
        pos = np.asarray(positions, dtype=np.int64)
        return self.replace(
            name=name or self.name,
            class_names=list(self.class_names),
            metadata={k: v[pos] for k, v in self.metadata.items()},
            index=self.index[pos],
            **{f: getattr(self, f)[pos] for f in self.PER_IMAGE},
        )

    def replace(self, **changes: Any) -> ClinicalDataset:
        """A copy with some fields changed, of the same type (a segmentation set keeps its masks)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def concat(cls, parts: Sequence[ClinicalDataset], name: str) -> ClinicalDataset:
        """One view made of ``parts`` in sequence; they must be views of one dataset's sources.

        Metadata keys missing from any part are dropped.
        """
        if not parts:
            raise DataError(f"{name}: nothing to concatenate")
        first = parts[0]
        if any(p.source is not first.source or type(p) is not type(first) for p in parts):
            raise DataError(f"{name}: can only join views of one dataset (one image source)")
        keys = set.intersection(*(set(p.metadata) for p in parts))
        return first.replace(
            name=name,
            metadata={k: np.concatenate([p.metadata[k] for p in parts]) for k in sorted(keys)},
            index=np.concatenate([p.index for p in parts]),
            **{f: np.concatenate([getattr(p, f) for p in parts]) for f in first.PER_IMAGE},
        )

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.metadata["split"].tolist())) if "split" in self.metadata else []

    @property
    def domains(self) -> list[str]:
        return sorted(set(self.metadata["domain"].tolist())) if "domain" in self.metadata else []

    def split(self, name: str) -> ClinicalDataset:
        """The images of one split; fails if the split is absent or empty."""
        if "split" not in self.metadata:
            raise DataError(f"{self.name}: has no 'split' metadata, so no split {name!r}")
        pos = np.flatnonzero(self.metadata["split"] == name)
        if len(pos) == 0:
            raise DataError(
                f"{self.name}: split {name!r} is empty; splits present: {self.splits or 'none'}"
            )
        return self.subset(pos, name=f"{self.name}/{name}")

    def where(self, **filters: str | Sequence[str]) -> ClinicalDataset:
        """The images whose metadata match, e.g. ``where(domain=["site-a"], split="test")``."""
        keep = np.ones(len(self), dtype=bool)
        for key, want in filters.items():
            values = [want] if isinstance(want, str) else list(want)
            keep &= np.isin(self.meta(key), values)
        if not keep.any():
            raise DataError(f"{self.name}: no images match {filters}")
        desc = ",".join(f"{k}={v}" for k, v in filters.items())
        return self.subset(np.flatnonzero(keep), name=f"{self.name}[{desc}]")

    def require_classes(self, what: str = "training data", minimum: int = 2) -> None:
        """Fail unless images of at least ``minimum`` classes are present (single-label tasks).

        A classifier trained on one class predicts it everywhere and scores a perfect balanced
        accuracy on a test set of that class: refuse, naming what there is.
        """
        if self.labels.ndim != 1:
            return
        present = np.unique(self.labels)
        if len(present) < minimum:
            names = [self.class_names[int(c)] for c in present]
            raise DataError(
                f"{self.name}: the {what} holds {len(self)} images of only the class(es) {names}; "
                f"training needs images of at least {minimum} classes (check the labels, the "
                "split or the source domain)"
            )

    def class_counts(self) -> np.ndarray:
        if self.task == "multilabel":
            return self.labels.sum(0)
        return np.bincount(self.labels, minlength=self.num_classes)

    def fingerprint(self) -> str:
        """A hash of pixels source, the selected images, labels and metadata."""
        h = hashlib.sha256(self.source.fingerprint().encode())
        h.update(np.ascontiguousarray(self.index).data)
        h.update(np.ascontiguousarray(self.labels).data)
        h.update("|".join(self.class_names).encode())
        for key in sorted(self.metadata):
            h.update(key.encode())
            h.update("\x1f".join(self.metadata[key].tolist()).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        out = {
            "name": self.name,
            "images": len(self),
            "classes": list(self.class_names),
            "task": self.task,
            "modality": self.modality,
            "fingerprint": self.fingerprint(),
        }
        for key in ("split", "domain"):
            if key in self.metadata:
                vals, counts = np.unique(self.metadata[key], return_counts=True)
                out[key + "s"] = dict(zip(vals.tolist(), counts.tolist(), strict=True))
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    # --- batches -----------------------------------------------------------------------------
    def batches(
        self,
        preprocess: Callable[[list[np.ndarray]], torch.Tensor],
        batch_size: int = 64,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        workers: int | None = None,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Yield ``(images, labels, positions)``; images go through ``preprocess`` batch-wise.

        ``workers`` processes decode and preprocess batches ahead (None: up to 4 when the images
        are read from files, none for images in memory); ``pin_memory`` pins each batch for a
        fast copy to a CUDA device. Neither changes what is yielded. With a ``device`` the images
        come out on it: workers stack uint8 images, the float work (scaling, channels, resize,
        normalisation) runs on ``device`` (see :mod:`clinadapt.models.stages`).
        """
        if len(self) == 0:
            raise DataError(f"{self.name}: no images to iterate over")
        if workers is not None and workers < 0:
            raise DataError(f"{self.name}: workers must be >= 0, got {workers}")
        chunks = batch_chunks(
            len(self), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        if not chunks:
            return
        n = auto_workers(self) if workers is None else workers
        yield from iter_batches(self, preprocess, chunks, n, pin_memory, device)
