"""Volumes as first-class data: 3D intensity arrays with their voxel spacing, for classification
and segmentation.

A volume is a float32 (X, Y, Z) array in [0, 1] in the canonical RAS+ frame: a higher index
moves towards the patient's Right, Anterior and Superior along axes 0, 1 and 2 (nibabel's
``as_closest_canonical``, MONAI's ``Orientation("RAS")``), so axis 2 is the axial (slice) axis. Intensities arrive already windowed by the reader (a CT window in HU, or the
0.5-99.5 percentiles of an MRI volume), as 2D images arrive as windowed uint8: the model's own
preprocessing normalises from there. ``spacing`` (N, 3) is millimetres per voxel along the three
axes of each volume, kept for surface metrics and physical sizes.
"""

from __future__ import annotations

import abc
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from clinadapt.data.base import SEGMENTATION, ClinicalDataset, ImageSource, Task, hash_files
from clinadapt.data.segmentation import BACKGROUND, SegmentationDataset
from clinadapt.errors import DataError

#: The axis along which a volume's slices are axial (RAS+: superior is axis 2).
SLICE_AXIS = 2


def check_volume(volume: np.ndarray, where: str) -> np.ndarray:
    """A decoded volume as float32 (X,Y,Z) with finite values; uint8 volumes are scaled by 1/255."""
    v = np.asarray(volume)
    if v.ndim == 4 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise DataError(f"{where}: a volume must be 3D (X,Y,Z), got shape {v.shape}")
    if min(v.shape) < 1:
        raise DataError(f"{where}: the volume is empty ({v.shape})")
    if v.dtype == np.uint8:
        return v.astype(np.float32) / 255.0
    if not np.issubdtype(v.dtype, np.floating):
        raise DataError(f"{where}: volume voxels are {v.dtype}; expected float in [0,1] or uint8")
    v = v.astype(np.float32, copy=False)
    if not np.isfinite(v).all():
        raise DataError(f"{where}: the volume holds non-finite values (NaN or inf)")
    return v


class VolumeSource(ImageSource):
    """Where volumes come from: ``load(i)`` returns a float32 (X,Y,Z) array in [0, 1]."""

    @abc.abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Decode volume ``i`` as float32 intensities in [0, 1]."""


class ArrayVolumes(VolumeSource):
    """Volumes held in memory as one (N,X,Y,Z) array: uint8 (scaled by 1/255) or float in [0,1]."""

    def __init__(self, array: np.ndarray, origin: str = "volumes") -> None:
        array = np.asarray(array)
        if array.ndim == 5 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 4:
            raise DataError(f"{origin}: volumes must be (N,X,Y,Z), got {array.shape}")
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"{origin}: volumes must be uint8 or float, got {array.dtype}")
        if array.dtype != np.uint8:
            array = array.astype(np.float32, copy=False)
            if not np.isfinite(array).all():
                raise DataError(f"{origin}: the volumes hold non-finite values")
        self.array = array
        self.origin = origin
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.array)

    def load(self, i: int) -> np.ndarray:
        v = self.array[i]
        return v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256(f"{self.array.shape}|{self.array.dtype}".encode())
            h.update(np.ascontiguousarray(self.array).data)
            self._fp = h.hexdigest()
        return self._fp


class FileVolumes(VolumeSource):
    """Volumes read from files (or DICOM series folders) by ``reader(path) -> array``.

    Decoding, reorienting and resampling a volume is slow, so the most recently used volumes
    are kept, up to ``cache_bytes`` (default 1 GiB). A reader failure becomes a DataError
    naming the file.
    """

    def __init__(
        self,
        paths: Sequence[str],
        reader: Callable[[str], np.ndarray],
        settings: str = "",
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.reader = reader
        self.settings = settings  # what the reader does, part of the fingerprint
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        path = self.paths[i]
        try:
            v = self.reader(path)
        except DataError:
            raise
        except Exception as e:  # corrupt or unreadable: name the file
            raise DataError(f"cannot read volume {path!r}: {type(e).__name__}: {e}") from e
        v = check_volume(v, path)
        v.flags.writeable = False
        self._cache[i] = v
        while (
            sum(a.nbytes for a in self._cache.values()) > self.cache_bytes and len(self._cache) > 1
        ):
            self._cache.popitem(last=False)
        return v

    def describe(self, i: int) -> str:
        return self.paths[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.settings.encode())
        return hash_files(h, self.paths).hexdigest()


@dataclass(repr=False)
class VolumeDataset(ClinicalDataset):
    """Volumes with labels, class names, modality, per-volume metadata and voxel spacing.

    ``image(i)`` (or ``volume(i)``) is a float32 (X,Y,Z) array in [0, 1]; ``spacing`` (N, 3) mm
    per voxel along its axes; ``spacing_origin`` says where the spacing came from.
    """

    spacing: np.ndarray | None = None
    spacing_origin: str = "given"

    spatial_dims: ClassVar[int] = 3
    PER_IMAGE: ClassVar[tuple[str, ...]] = ("labels", "spacing")

    def __post_init__(self) -> None:
        if not isinstance(self.source, VolumeSource):
            raise DataError(f"{self.name}: a volume dataset needs a VolumeSource")
        n = len(self.source) if self.index is None else len(self.index)
        self.spacing, origin = _spacing(self.spacing, n, self.name)
        self.spacing_origin = origin or self.spacing_origin
        super().__post_init__()

    def volume(self, i: int) -> np.ndarray:
        """Volume ``i`` of the view (float32 (X,Y,Z) in [0, 1])."""
        return self.image(i)

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(np.ascontiguousarray(self.spacing).data)
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        out = super().summary()
        out["spatial_dims"] = 3
        out["spacing_mm"] = _spacing_summary(self.spacing)
        out["spacing_origin"] = self.spacing_origin
        return out


def _spacing(spacing: Any, n: int, name: str) -> tuple[np.ndarray, str | None]:
    """(N, 3) positive spacing from None (1 mm, said so), (3,) or (N, 3)."""
    if spacing is None:
        return np.ones((n, 3)), "assumed 1 mm (unknown)"
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape == (3,):
        s = np.broadcast_to(s, (n, 3)).copy()
    if s.shape != (n, 3):
        raise DataError(f"{name}: spacing must be (N,3) or (3,) mm, got {s.shape}")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise DataError(f"{name}: voxel spacing must be positive mm, got {s.min()}")
    return s, None


def _spacing_summary(spacing: np.ndarray) -> list[str]:
    return sorted({"x".join(f"{v:g}" for v in row) for row in spacing.tolist()})[:10]


class VolumeMasks(ImageSource):
    """Label volumes parallel to a volume source: ``load(i)`` is a uint8 (X,Y,Z) map of 0..C."""

    num_classes: int

    @abc.abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Decode label volume ``i`` (0 background, 1..C classes)."""


class ArrayVolumeMasks(VolumeMasks):
    """Label volumes held in memory as one integer (N,X,Y,Z) array of 0..C."""

    def __init__(self, array: np.ndarray, num_classes: int, origin: str = "label maps") -> None:
        array = np.asarray(array)
        if array.ndim != 4:
            raise DataError(f"{origin}: label volumes must be (N,X,Y,Z), got {array.shape}")
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise DataError(f"{origin}: label volumes must hold integers, got {array.dtype}")
        if not 1 <= num_classes <= 255:
            raise DataError(f"{origin}: 1..255 classes fit a label map, got {num_classes}")
        if array.size and (array.min() < 0 or array.max() > num_classes):
            where = np.argwhere((array < 0) | (array > num_classes))[0]
            bad = int(array[tuple(where)])
            raise DataError(
                f"{origin}[{int(where[0])}]: label {bad} is outside 0..{num_classes} "
                f"(background and {num_classes} classes)"
            )
        self.array = array.astype(np.uint8)
        self.num_classes = int(num_classes)
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
            h = hashlib.sha256(f"{self.array.shape}|{self.num_classes}".encode())
            h.update(np.ascontiguousarray(self.array).data)
            self._fp = h.hexdigest()
        return self._fp


class FileVolumeMasks(VolumeMasks):
    """Label volumes read by ``reader(i) -> uint8 array`` (aligned with volume ``i``), cached."""

    def __init__(
        self,
        paths: Sequence[str],
        reader: Callable[[int], np.ndarray],
        num_classes: int,
        settings: str = "",
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.reader = reader
        self.num_classes = int(num_classes)
        self.settings = settings
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        hit = self._cache.get(i)
        if hit is None:
            hit = self._cache[i] = np.asarray(self.reader(i), dtype=np.uint8)
            hit.flags.writeable = False
            while len(self._cache) > 64:
                self._cache.popitem(last=False)
        return hit

    def describe(self, i: int) -> str:
        return self.paths[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.settings}|{self.num_classes}".encode())
        return hash_files(h, self.paths).hexdigest()


def class_voxels(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) voxel count of classes 1..C in a label volume."""
    counts = np.bincount(np.asarray(label_map).ravel(), minlength=num_classes + 1)
    return counts[1 : num_classes + 1]


@dataclass(repr=False)
class VolumeSegmentationDataset(VolumeDataset):
    """Volumes with reference label volumes (0 background, 1..C = ``class_names``).

    ``masks`` is parallel to ``source``; per volume of the view: ``spacing`` (N, 3) mm,
    ``areas`` (N, C) reference voxel counts per class (computed by the reader while it checked
    every label map), and ``labels`` (N, C) their presence (0/1). The field names follow the 2D
    :class:`~clinadapt.data.segmentation.SegmentationDataset`, so test-time methods and stream
    orders that read ``mask(i)`` and ``areas`` work on either.
    """

    task: Task = SEGMENTATION
    masks: VolumeMasks | None = None
    areas: np.ndarray | None = None

    PER_IMAGE: ClassVar[tuple[str, ...]] = ("labels", "spacing", "areas")

    def __post_init__(self) -> None:
        if self.masks is None:
            raise DataError(f"{self.name}: a segmentation dataset needs label volumes")
        if len(self.masks) != len(self.source):
            raise DataError(
                f"{self.name}: {len(self.masks)} label volumes for {len(self.source)} volumes"
            )
        c = len(self.class_names)
        if self.masks.num_classes != c:
            raise DataError(
                f"{self.name}: the label volumes hold {self.masks.num_classes} classes but "
                f"class_names lists {c}: {self.class_names}"
            )
        if BACKGROUND in self.class_names:
            raise DataError(
                f"{self.name}: class_names name the labels 1..C; leave {BACKGROUND!r} out"
            )
        n = len(self.source) if self.index is None else len(self.index)
        if self.areas is None:
            raise DataError(f"{self.name}: areas (N,C) reference voxel counts are required")
        self.areas = np.asarray(self.areas, dtype=np.int64)
        if self.areas.shape != (n, c):
            raise DataError(f"{self.name}: areas must be ({n}, {c}), got {self.areas.shape}")
        if self.labels is None:
            self.labels = (self.areas > 0).astype(np.int64)
        super().__post_init__()

    # the rules of 2D label maps: labels are the class presence; one class is binary
    _check_labels = SegmentationDataset._check_labels
    binary = SegmentationDataset.binary

    def mask(self, i: int) -> np.ndarray:
        """The reference label volume of volume ``i`` (uint8, 0..C)."""
        return self.masks.load(int(self.index[i]))

    def describe_mask(self, i: int) -> str:
        return self.masks.describe(int(self.index[i]))

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Volume ``i`` and its label volume; a shape mismatch is a DataError naming both."""
        vol, mask = self.image(i), self.mask(i)
        if vol.shape != mask.shape:
            raise DataError(
                f"{self.describe(i)}: the volume is {'x'.join(map(str, vol.shape))} but its label "
                f"map {self.describe_mask(i)} is {'x'.join(map(str, mask.shape))}"
            )
        return vol, mask

    def volumes_ml(self) -> np.ndarray:
        """(N, C) reference volume per class in millilitres."""
        return self.areas * np.prod(self.spacing, axis=1)[:, None] / 1000.0

    def empty(self) -> np.ndarray:
        """(N,) whether a volume has no foreground at all."""
        return self.labels.sum(1) == 0

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(self.masks.fingerprint().encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        out = super().summary()
        out["empty_volumes"] = int(self.empty().sum())
        out["volumes_with"] = dict(zip(self.class_names, self.labels.sum(0).tolist(), strict=True))
        return out


__all__ = [
    "SLICE_AXIS",
    "ArrayVolumeMasks",
    "ArrayVolumes",
    "FileVolumeMasks",
    "FileVolumes",
    "VolumeDataset",
    "VolumeMasks",
    "VolumeSegmentationDataset",
    "VolumeSource",
    "check_volume",
    "class_voxels",
]
