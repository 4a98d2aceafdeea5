"""The built-in clinical-shift data for segmentation: chest-like images with lung and lesion masks.

The same simulated sites and scanners as ``clinical-shift`` (contrast, gamma, noise, blur,
resolution, drift, bias field): the anatomy is drawn first, the reference masks are taken from
that anatomy, then each site's scanner turns it into pixels. A model trained on one site meets
different pixels for the same masks elsewhere, so its Dice drops there. Lesions are irregular
round opacities inside the lungs, from about 17 to 70 mm across; some images have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clinadapt.data.base import ArraySource
from clinadapt.data.registry import DATASETS
from clinadapt.data.segmentation import ArrayMasks, SegmentationDataset, class_areas
from clinadapt.data.synthetic import (
    SITES,
    _acquire,
    _anatomy,
    _chest,
    _grid,
    simulate_sites,
)
from clinadapt.errors import DataError

SEG_CLASSES = ("lung", "lesion")
FIELD_OF_VIEW_MM = 350.0  # an adult chest radiograph's width
# Fraction of images without a lesion, per site (the lung is always there).
EMPTY_FRACTION = {"site-a": 0.3, "site-b": 0.35, "site-c": 0.25, "site-d": 0.3}
LESION_RADIUS = (0.05, 0.2)  # in the [-1, 1] frame: 17.5-70 mm across at a 350 mm field
LESION_CONTRAST = (0.12, 0.26)


def _lesion(rng: np.random.Generator, x, y, lung_cx: float, lung_cy: float, s: float):
    """One irregular round opacity: its soft profile (for the pixels) and its hard mask."""
    r = np.exp(rng.uniform(*np.log(LESION_RADIUS))) * s
    cx = lung_cx + rng.uniform(-0.12, 0.12) * s
    cy = lung_cy + rng.uniform(-0.32, 0.3) * s
    theta = np.arctan2(y - cy, x - cx)
    harmonics = rng.uniform(-0.12, 0.12, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    edge = r * (
        1
        + sum(
            a * np.cos((k + 2) * theta + p)
            for k, (a, p) in enumerate(zip(harmonics, phases, strict=True))
        )
    )
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    soft = 1.0 / (1.0 + np.exp(np.clip((d - edge) / (0.15 * r), -60.0, 60.0)))
    return soft, soft > 0.5


def make_clinical_shift_seg(
    seed: int = 0,
    size: int = 64,
    patients_per_site: int = 40,
    images_per_patient: tuple[int, int] = (1, 2),
    sites: Sequence[str] | None = None,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    classes: Sequence[str] = SEG_CLASSES,
    max_lesions: int = 2,
) -> SegmentationDataset:
    """Generate the built-in segmentation data (deterministic from ``seed``).

    ``classes`` picks the labelled structures: ``("lung", "lesion")`` (default), or one of them
    for a binary task. Each image has 0..``max_lesions`` lesions (none with the site's
    :data:`EMPTY_FRACTION`). Pixel spacing is the 350 mm field over ``size`` pixels. Metadata as
    ``clinical-shift``: split (per patient), domain, scanner, sex, age_group, patient_id.
    """
    classes = list(classes)
    if (
        not classes
        or any(c not in SEG_CLASSES for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise DataError(
            f"clinical-shift-seg: classes must be drawn from {SEG_CLASSES}, got {classes}"
        )
    if max_lesions < 1:
        raise DataError(f"clinical-shift-seg: max_lesions must be >= 1, got {max_lesions}")
    x, y = _grid(size)

    def patient(rng: np.random.Generator, site_name: str) -> dict[str, Any]:
        site = SITES[site_name]
        female = rng.random() < site.female_fraction
        old = rng.random() < site.old_fraction
        return {"female": female, "old": old, "anat": _anatomy(rng, size, old)}

    def image(rng: np.random.Generator, site_name: str, p: dict[str, Any]) -> tuple:
        img, lungs, (s, dx, dy) = _chest(rng, size, p["anat"], x, y)
        lung = (lungs[0] + lungs[1]) > 0.5
        lesion = np.zeros_like(lung)
        n = 0 if rng.random() < EMPTY_FRACTION[site_name] else int(rng.integers(1, max_lesions + 1))
        for _ in range(n):
            side = int(rng.integers(2))
            soft, hard = _lesion(rng, x, y, dx + (2 * side - 1) * 0.38 * s, dy - 0.05, s)
            img = img + rng.uniform(*LESION_CONTRAST) * soft
            lesion |= hard
        label = np.zeros(lung.shape, dtype=np.uint8)
        if "lung" in classes:
            label[lung] = classes.index("lung") + 1
        if "lesion" in classes:
            label[lesion] = classes.index("lesion") + 1
        return _acquire(rng, img, SITES[site_name], x, y), label

    drawn, meta = simulate_sites(
        "clinical-shift-seg",
        seed,
        size,
        patients_per_site,
        images_per_patient,
        sites,
        split_fractions,
        patient,
        image,
    )
    masks = np.stack([d[1] for d in drawn])
    origin = f"clinical-shift-seg(seed={seed},size={size})"
    return SegmentationDataset(
        name="clinical-shift-seg",
        source=ArraySource(np.stack([d[0] for d in drawn]), origin=origin),
        labels=None,
        class_names=classes,
        modality="xray",
        metadata=meta,
        masks=ArrayMasks(masks, len(classes), origin=f"{origin} masks"),
        areas=np.stack([class_areas(m, len(classes)) for m in masks]),
        spacing=np.full((len(masks), 2), FIELD_OF_VIEW_MM / size),
        spacing_origin=f"simulated {FIELD_OF_VIEW_MM:g} mm field of view",
    )


DATASETS.register("clinical-shift-seg", make_clinical_shift_seg)  # declared in datasets.json
