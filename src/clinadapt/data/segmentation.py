"""The segmentation dataset: images with reference label maps, pixel spacing and metadata.

A label map holds 0 for background and 1..C for ``class_names[0..C-1]``. Masks live in a
:class:`MaskSource` parallel to the image source (same positions), so every view of the dataset
(splits, domains, corruptions, few-shot sets) keeps each image with its mask.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from clinadapt.data.base import SEGMENTATION, ArraySource, ClinicalDataset, ImageSource, Task
from clinadapt.errors import DataError

BACKGROUND = "background"
# The two encodings of a binary mask in the wild: 0/1 label maps and 0/255 pictures.
BINARY_VALUES = ((0, 1), (0, 255))


class MaskSource(ImageSource):
    """Where reference masks come from: ``load(i)`` returns a uint8 (H,W) map of 0..C."""

    num_classes: int

    @abc.abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Decode mask ``i`` as class indices (0 background, 1..C classes)."""


class ArrayMasks(ArraySource, MaskSource):
    """Label maps held in memory as one integer array (N,H,W) of 0..C."""

    def __init__(self, array: np.ndarray, num_classes: int, origin: str = "masks") -> None:
        array = np.asarray(array)
        if array.ndim != 3:
            raise DataError(f"{origin}: masks must be (N,H,W) label maps, got {array.shape}")
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise DataError(f"{origin}: masks must hold integer labels, got {array.dtype}")
        if num_classes < 1 or num_classes > 255:
            raise DataError(f"{origin}: 1..255 classes fit a label map, got {num_classes}")
        if array.size and (array.min() < 0 or array.max() > num_classes):
            bad = int(array.max() if array.max() > num_classes else array.min())
            where = np.argwhere((array < 0) | (array > num_classes))[0]
            raise DataError(
                f"{origin}[{int(where[0])}]: label {bad} is outside 0..{num_classes} "
                f"(background and {num_classes} classes)"
            )
        super().__init__(array.astype(np.uint8), origin=origin)
        self.num_classes = int(num_classes)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.num_classes}|{super().fingerprint()}".encode()).hexdigest()


def label_lookup(
    label_map: Mapping[int, str] | None, class_names: Sequence[str], where: str
) -> dict[int, int]:
    """Mask value -> class index (0 background, c+1 for ``class_names[c]``).

    Without ``label_map`` the values are the indices themselves (0..C); a single class also
    accepts 255 as foreground (a 0/255 picture).
    """
    names = list(class_names)
    if label_map is None:
        lut = {v: v for v in range(len(names) + 1)}
        if len(names) == 1:
            lut[255] = 1
        return lut
    lut: dict[int, int] = {}
    for value, name in label_map.items():
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: label map key {value!r} is not an integer mask value"
            ) from None
        name = str(name)
        if name == BACKGROUND:
            lut[v] = 0
        elif name in names:
            lut[v] = names.index(name) + 1
        else:
            raise DataError(
                f"{where}: label map names {name!r}, which is not among the classes {names} "
                f"(or {BACKGROUND!r})"
            )
    lut.setdefault(0, 0)
    return lut


def describe_lookup(lut: Mapping[int, int], class_names: Sequence[str]) -> str:
    names = [BACKGROUND, *class_names]
    return "{" + ", ".join(f"{v}: {names[c]}" for v, c in sorted(lut.items())) + "}"


def integer_mask(raw: np.ndarray, where: str) -> np.ndarray:
    """A decoded mask as integers; booleans become 0/1, integral floats are accepted."""
    raw = np.asarray(raw)
    if raw.dtype == np.bool_:
        return raw.astype(np.uint8)
    if np.issubdtype(raw.dtype, np.integer):
        return raw
    if not np.issubdtype(raw.dtype, np.floating):
        raise DataError(f"{where}: a mask must hold integer labels, got {raw.dtype}")
    finite = np.isfinite(raw)
    if not finite.all() or not np.array_equal(raw, np.round(raw)):
        sample = raw[~finite | (raw != np.round(raw))][0]
        raise DataError(
            f"{where}: the mask holds non-integer values (e.g. {sample}); a label map needs "
            "integer labels (threshold soft masks first)"
        )
    return raw.astype(np.int64)


def check_mask_values(
    values: Sequence[int], lut: Mapping[int, int], class_names: Sequence[str], where: str
) -> None:
    """Check a mask's distinct values: every value must be in the label map, and a binary task
    (one class) gets one foreground value only (0/1 or 0/255, not both). Errors name ``where``."""
    values = sorted(int(v) for v in values)
    hint = (
        " (JPEG is lossy: save masks as PNG)" if where.lower().endswith((".jpg", ".jpeg")) else ""
    )
    if len(class_names) == 1:
        fg_used = [v for v in values if lut.get(v) == 1]
        if len(fg_used) > 1 or any(v not in lut for v in values):
            shown = values[:8] + (["..."] if len(values) > 8 else [])
            fg = sorted(v for v, c in lut.items() if c == 1)
            bg = sorted(v for v, c in lut.items() if c == 0)
            expect = " or ".join(f"{'/'.join(map(str, bg))} and {v}" for v in fg)
            raise DataError(
                f"{where}: not a binary mask: it holds the values {shown}, but the task has one "
                f"class ({class_names[0]!r}) and expects {expect}{hint}"
            )
    unknown = [v for v in values if v not in lut]
    if unknown:
        raise DataError(
            f"{where}: mask value(s) {unknown[:8]} are outside the label map "
            f"{describe_lookup(lut, class_names)}{hint}"
        )


def to_label_map(
    raw: np.ndarray, lut: Mapping[int, int], class_names: Sequence[str], where: str
) -> np.ndarray:
    """Map a decoded mask's values onto class indices (uint8); bad values are a DataError
    naming ``where`` (see :func:`integer_mask` and :func:`check_mask_values`)."""
    raw = integer_mask(raw, where)
    values = np.unique(raw)
    check_mask_values(values.tolist(), lut, class_names, where)
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi < 65536:
        table = np.zeros(hi + 1, dtype=np.uint8)
        for v, c in lut.items():
            if 0 <= v <= hi:
                table[v] = c
        return table[raw]
    out = np.zeros(raw.shape, dtype=np.uint8)
    for v, c in lut.items():
        out[raw == v] = c
    return out


def class_areas(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) pixel count of classes 1..C in a label map."""
    return np.bincount(np.asarray(mask).ravel(), minlength=num_classes + 1)[1 : num_classes + 1]


@dataclass(repr=False)
class SegmentationDataset(ClinicalDataset):
    """Images with reference label maps (0 background, 1..C = ``class_names``) and pixel spacing.

    ``masks`` is parallel to ``source`` (same positions). Per image of the view: ``spacing``
    (N,2) mm per pixel (row, col); ``areas`` (N,C) reference pixel counts per class, computed
    by the reader while it validated every mask; ``labels`` (N,C) is their presence (0/1), so
    an empty image has no class present. ``spacing_origin`` says where the spacing came from.
    """

    task: Task = SEGMENTATION
    masks: MaskSource | None = None
    spacing: np.ndarray | None = None
    areas: np.ndarray | None = None
    spacing_origin: str = "given"
    # How each image's prompts derive from its reference (a segmentation.prompts.PromptSpec),
    # and the seed: prompts are part of a segmentation example, like labels of a classification one.
    prompt_spec: Any = None
    prompt_seed: int = 0

    PER_IMAGE: ClassVar[tuple[str, ...]] = ("labels", "spacing", "areas")

    def __post_init__(self) -> None:
        if self.masks is None:
            raise DataError(f"{self.name}: a segmentation dataset needs masks")
        if len(self.masks) != len(self.source):
            raise DataError(f"{self.name}: {len(self.masks)} masks for {len(self.source)} images")
        n = len(self.source) if self.index is None else len(self.index)
        c = len(self.class_names)
        if self.masks.num_classes != c:
            raise DataError(
                f"{self.name}: the masks hold {self.masks.num_classes} classes but class_names "
                f"lists {c}: {self.class_names}"
            )
        if BACKGROUND in self.class_names:
            raise DataError(
                f"{self.name}: class_names name the labels 1..C; leave {BACKGROUND!r} (label 0) out"
            )
        if self.areas is None:
            raise DataError(f"{self.name}: areas (N,C) reference pixel counts are required")
        self.areas = np.asarray(self.areas, dtype=np.int64)
        if self.areas.shape != (n, c):
            raise DataError(f"{self.name}: areas must be ({n}, {c}), got {self.areas.shape}")
        if self.labels is None:
            self.labels = (self.areas > 0).astype(np.int64)
        spacing = np.ones((n, 2)) if self.spacing is None else np.asarray(self.spacing, float)
        if spacing.shape == (2,):
            spacing = np.broadcast_to(spacing, (n, 2)).copy()
        if spacing.shape != (n, 2):
            raise DataError(f"{self.name}: spacing must be (N,2) or (2,), got {spacing.shape}")
        if not (np.isfinite(spacing).all() and (spacing > 0).all()):
            raise DataError(f"{self.name}: pixel spacing must be positive mm, got {spacing.min()}")
        if self.spacing is None:
            self.spacing_origin = "assumed 1 mm (unknown)"
        self.spacing = spacing
        super().__post_init__()

    def _check_labels(self) -> None:
        if self.task != SEGMENTATION:
            raise DataError(f"{self.name}: a segmentation dataset has task {SEGMENTATION!r}")
        want = (len(self), self.num_classes)
        if self.labels.shape != want or not np.array_equal(self.labels, self.areas > 0):
            raise DataError(f"{self.name}: labels must be the class presence (areas > 0), {want}")
        self.labels = self.labels.astype(np.int64)

    @property
    def binary(self) -> bool:
        """One foreground class."""
        return self.num_classes == 1

    def mask(self, i: int) -> np.ndarray:
        """The reference label map of image ``i`` (uint8, 0..C)."""
        mask = self.masks.load(int(self.index[i]))
        return mask if mask.flags.writeable else mask.copy()  # shared (cached) masks stay intact

    def describe_mask(self, i: int) -> str:
        return self.masks.describe(int(self.index[i]))

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i`` and its mask; a size mismatch is a DataError naming both."""
        img, mask = self.image(i), self.mask(i)
        if img.shape[:2] != mask.shape:
            raise DataError(
                f"{self.describe(i)}: the image is {img.shape[0]}x{img.shape[1]} but its mask "
                f"{self.describe_mask(i)} is {mask.shape[0]}x{mask.shape[1]}"
            )
        return img, mask

    def with_prompts(self, spec: Any, seed: int = 0) -> SegmentationDataset:
        """This view with a prompt protocol: ``prompts(i)`` derives image ``i``'s prompts."""
        return self.replace(prompt_spec=spec, prompt_seed=int(seed))

    def prompts(self, i: int) -> Any:
        """The prompts of image ``i`` derived from its reference (a ``DerivedPrompts``).

        Keyed by the image's position in its source, so every view, stream order and corrupted
        copy of an image gets the same prompts.
        """
        if self.prompt_spec is None:
            raise DataError(
                f"{self.name}: no prompt protocol attached; give the run a prompt "
                "(e.g. prompt: {kind: box}) or call with_prompts(spec)"
            )
        if self.prompt_spec.kind == "file":  # the user's own, by image file name
            return self.prompt_spec.given(self.mask(i), self.describe(i))
        return self.prompt_spec.derive(self.mask(i), int(self.index[i]), self.prompt_seed)

    def draw_prompts(self, i: int, rng: np.random.Generator) -> Any:
        """A fresh draw of image ``i``'s prompts for a training step (MedSAM re-draws its box
        jitter each time it loads an image); prompts given in a file are the same every time."""
        spec = self.prompt_spec
        if spec is None or spec.kind == "file":  # (no protocol: the error of prompts(i))
            return self.prompts(i)
        return spec.draw(self.mask(i), rng)

    def areas_mm2(self) -> np.ndarray:
        """(N,C) reference area per class in square millimetres."""
        return self.areas * (self.spacing[:, 0] * self.spacing[:, 1])[:, None]

    def empty(self) -> np.ndarray:
        """(N,) whether an image has no foreground at all."""
        return self.labels.sum(1) == 0

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(self.masks.fingerprint().encode())
        h.update(np.ascontiguousarray(self.spacing).data)
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        out = super().summary()
        out["empty_images"] = int(self.empty().sum())
        out["images_with"] = dict(zip(self.class_names, self.labels.sum(0).tolist(), strict=True))
        out["spacing_mm"] = sorted({f"{r:g}x{c:g}" for r, c in self.spacing.tolist()})[:10]
        out["spacing_origin"] = self.spacing_origin
        return out


__all__ = [
    "BACKGROUND",
    "ArrayMasks",
    "MaskSource",
    "SegmentationDataset",
    "check_mask_values",
    "class_areas",
    "integer_mask",
    "label_lookup",
    "to_label_map",
]
