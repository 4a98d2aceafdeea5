"""The built-in clinical-shift volumes: small abdominal-CT-like volumes with lesions and masks.

Each patient's anatomy is drawn first in Hounsfield units (air, fat rim, soft tissue, a liver-like
organ with texture, the spine, and 0-2 hypo- or hyper-dense lesions inside the organ); the
reference masks (organ, lesion) come from that anatomy. Each site's scanner then acquires it:
a calibration gain and offset, thick slices (partial-volume averaging along z, resampled back to
the grid), lower in-plane resolution, a reconstruction blur, a smooth multiplicative field
(cupping / bias field) and noise, before the abdomen window (level 40, width 400 HU) maps the
result onto [0, 1]. So the same anatomy gives different voxels at every site, as a new scanner
does: a model trained on one site drops on the others. Deterministic from the seed.

``clinical-shift-3d`` classifies a volume as ``normal`` or ``lesion``;
``clinical-shift-3d-seg`` segments the organ and the lesions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, uniform_filter1d, zoom

from clinadapt.data.registry import DATASETS
from clinadapt.data.synthetic import simulate_sites
from clinadapt.data.volume import (
    ArrayVolumeMasks,
    ArrayVolumes,
    VolumeDataset,
    VolumeSegmentationDataset,
    class_voxels,
)
from clinadapt.errors import DataError

CLASS_NAMES_3D = ["normal", "lesion"]
SEG_CLASSES_3D = ("organ", "lesion")
FIELD_OF_VIEW_MM = 160.0  # a cube around the upper abdomen
WINDOW_HU = (-160.0, 240.0)  # the abdomen window: level 40, width 400
LESION_RADIUS_MM = (8.0, 22.0)


@dataclass(frozen=True)
class VolumeSiteProfile:
    """How one site's CT scanner turns anatomy (HU) into voxels."""

    scanner: str
    noise_hu: float = 8.0  # std of the (slightly correlated) noise
    slice_thickness: int = 1  # voxels averaged along z, acquired every that many, resampled back
    inplane_downsample: int = 1  # acquired at 1/k of the in-plane resolution
    blur: float = 0.0  # reconstruction kernel, Gaussian sigma in voxels at 32^3
    bias_field: float = 0.0  # amplitude of a smooth multiplicative field on attenuation
    gain: float = 1.0  # calibration: HU * gain + offset
    offset_hu: float = 0.0
    prevalence: float = 0.5  # share of patients with a lesion
    female_fraction: float = 0.5
    old_fraction: float = 0.4


VOLUME_SITES: dict[str, VolumeSiteProfile] = {
    # The reference site: thin slices, low noise, calibrated.
    "site-a": VolumeSiteProfile(scanner="ct-vendor-1"),
    # Thick slices (3 voxels averaged along z), more noise, a calibration drift and lower gain.
    "site-b": VolumeSiteProfile(
        scanner="ct-vendor-2-thick",
        noise_hu=16.0,
        slice_thickness=3,
        gain=0.8,
        offset_hu=30.0,
        prevalence=0.45,
        female_fraction=0.6,
        old_fraction=0.6,
    ),
    # Low dose: much more noise, half the in-plane resolution and a soft kernel.
    "site-c": VolumeSiteProfile(
        scanner="ct-vendor-3-lowdose",
        noise_hu=28.0,
        inplane_downsample=2,
        blur=0.7,
        prevalence=0.55,
        female_fraction=0.45,
        old_fraction=0.7,
    ),
    # Another vendor: harder contrast, a negative drift and a strong smooth field (cupping).
    "site-d": VolumeSiteProfile(
        scanner="ct-vendor-4",
        noise_hu=12.0,
        bias_field=0.06,
        gain=1.3,
        offset_hu=-35.0,
        prevalence=0.5,
        old_fraction=0.3,
    ),
}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    return np.meshgrid(c, c, c, indexing="ij")  # x (Right), y (Anterior), z (Superior)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """1 inside (d < 0), 0 outside, a logistic edge of ``width``."""
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -60.0, 60.0)))


def _ellipsoid(x, y, z, c, r, width):
    q = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
    return _soft(np.sqrt(q) - 1.0, width)


def _patient(rng: np.random.Generator, site: VolumeSiteProfile) -> dict[str, Any]:
    """Anatomy parameters of one patient (the organ, its lesions, the body habitus)."""
    lesion = rng.random() < site.prevalence
    n = int(rng.integers(1, 3)) if lesion else 0
    return {
        "female": rng.random() < site.female_fraction,
        "old": rng.random() < site.old_fraction,
        "label": int(lesion),
        "body": (rng.uniform(0.78, 0.9), rng.uniform(0.58, 0.7)),
        "fat": rng.uniform(0.05, 0.12),
        "organ_c": (rng.uniform(0.28, 0.4), rng.uniform(-0.05, 0.12), rng.uniform(-0.1, 0.2)),
        "organ_r": (rng.uniform(0.3, 0.4), rng.uniform(0.3, 0.4), rng.uniform(0.4, 0.55)),
        "organ_hu": rng.uniform(50.0, 70.0),
        "lesions": [
            {
                "u": rng.uniform(-0.5, 0.5, 3),
                "radius_mm": float(np.exp(rng.uniform(*np.log(LESION_RADIUS_MM)))),
                "delta_hu": float(rng.choice([-1.0, 1.0]) * rng.uniform(40.0, 70.0)),
                "bumps": rng.uniform(-0.15, 0.15, 3),
                "phase": rng.uniform(0, 2 * np.pi, 3),
            }
            for _ in range(n)
        ],
        "texture_seed": int(rng.integers(2**31)),
    }


def _anatomy(
    p: dict[str, Any], size: int, grids: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU volume, organ mask, lesion mask) of one patient."""
    x, y, z = grids
    w = 1.5 / size  # edge width: about a voxel
    bx, by = p["body"]
    body = _ellipsoid(x, y, z, (0.0, 0.0, 0.0), (bx, by, 9.0), w)
    inner = _ellipsoid(x, y, z, (0.0, 0.0, 0.0), (bx - p["fat"], by - p["fat"], 9.0), w)
    hu = -1000.0 + body * 900.0 + inner * 140.0  # air, fat (-100), soft tissue (40)
    spine = _ellipsoid(x, y, z, (0.0, -by + 0.2, 0.0), (0.1, 0.1, 9.0), w)
    hu += spine * 600.0
    organ_soft = _ellipsoid(x, y, z, p["organ_c"], p["organ_r"], w) * inner
    tex = np.random.default_rng(p["texture_seed"]).normal(0, 1, x.shape).astype(np.float32)
    tex = gaussian_filter(tex, 1.2)
    tex /= tex.std() + 1e-6
    hu += organ_soft * (p["organ_hu"] - 40.0 + 6.0 * tex)
    organ = organ_soft > 0.5
    lesion = np.zeros(x.shape, dtype=bool)
    half = FIELD_OF_VIEW_MM / 2
    for les in p["lesions"]:
        c = np.asarray(p["organ_c"]) + les["u"] * np.asarray(p["organ_r"]) * 0.8
        r = les["radius_mm"] / half
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        theta = np.arctan2(y - c[1], x - c[0])
        phi = np.arccos(np.clip((z - c[2]) / np.maximum(d, 1e-6), -1, 1))
        edge = r * (
            1
            + les["bumps"][0] * np.cos(2 * theta + les["phase"][0])
            + les["bumps"][1] * np.cos(3 * phi + les["phase"][1])
            + les["bumps"][2] * np.cos(theta + phi + les["phase"][2])
        )
        soft = _soft(d - edge, 0.2 * r) * organ_soft
        hu += les["delta_hu"] * soft
        lesion |= soft > 0.5
    return hu.astype(np.float32), organ & ~lesion, lesion


def _field(rng: np.random.Generator, grids) -> np.ndarray:
    """A smooth field in [-1, 1]: a random low-order polynomial of x, y, z."""
    x, y, z = grids
    a = rng.normal(0, 1, 7)
    f = a[0] * x + a[1] * y + a[2] * z + a[3] * x * y + a[4] * (x**2 + y**2) + a[5] * z**2
    f += a[6] * x * z
    return f / (np.abs(f).max() + 1e-6)


def acquire(rng: np.random.Generator, hu: np.ndarray, site: VolumeSiteProfile, grids) -> np.ndarray:
    """One site's scanner on an HU volume; returns float32 in [0, 1] (abdomen window)."""
    size = hu.shape[0]
    k = size / 32.0
    v = hu * site.gain + site.offset_hu
    if site.slice_thickness > 1:  # partial volume along z, acquired every t voxels, resampled
        t = site.slice_thickness
        v = uniform_filter1d(v, t, axis=2, mode="nearest")
        thick = v[:, :, t // 2 :: t]
        v = zoom(thick, (1, 1, size / thick.shape[2]), order=1, mode="nearest")[:, :, :size]
    if site.inplane_downsample > 1:
        f = site.inplane_downsample
        small = zoom(v, (1 / f, 1 / f, 1), order=1)
        v = zoom(small, (size / small.shape[0], size / small.shape[1], 1), order=1)
        v = v[:size, :size]
    if site.blur > 0:
        v = gaussian_filter(v, (site.blur * k, site.blur * k, 0))
    if site.bias_field:
        v = (v + 1000.0) * (1.0 + site.bias_field * _field(rng, grids)) - 1000.0
    noise = gaussian_filter(rng.normal(0, 1, v.shape), 0.6)
    v = v + site.noise_hu * noise / (noise.std() + 1e-6)
    lo, hi = WINDOW_HU
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _simulate(
    name: str,
    seed: int,
    size: int,
    patients_per_site: int,
    sites: Sequence[str] | None,
    split_fractions: tuple[float, float, float],
) -> tuple[list[Any], dict[str, np.ndarray]]:
    grids = _grid(size)

    def patient(rng: np.random.Generator, site_name: str) -> dict[str, Any]:
        return _patient(rng, VOLUME_SITES[site_name])

    def image(rng: np.random.Generator, site_name: str, p: dict[str, Any]) -> tuple:
        hu, organ, lesion = _anatomy(p, size, grids)
        labels = np.where(lesion, 2, np.where(organ, 1, 0)).astype(np.uint8)
        return acquire(rng, hu, VOLUME_SITES[site_name], grids), p["label"], labels

    return simulate_sites(
        name,
        seed,
        size,
        patients_per_site,
        (1, 1),
        sites,
        split_fractions,
        patient,
        image,
        profiles=VOLUME_SITES,  # type: ignore[arg-type]
        min_size=16,
    )


def make_clinical_shift_3d(
    seed: int = 0,
    size: int = 32,
    patients_per_site: int = 40,
    sites: Sequence[str] | None = None,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> VolumeDataset:
    """The built-in 3D classification data: is there a lesion in the organ? (deterministic).

    ``size``^3 voxels over a 160 mm field of view (5 mm voxels at 32). One volume per patient;
    metadata as ``clinical-shift``: split (per patient), domain, scanner, sex, age_group,
    patient_id.
    """
    drawn, meta = _simulate(
        "clinical-shift-3d", seed, size, patients_per_site, sites, split_fractions
    )
    return VolumeDataset(
        name="clinical-shift-3d",
        source=ArrayVolumes(
            np.stack([d[0] for d in drawn]), origin=f"clinical-shift-3d(seed={seed},size={size})"
        ),
        labels=np.asarray([d[1] for d in drawn]),
        class_names=list(CLASS_NAMES_3D),
        task="binary",
        modality="ct",
        metadata=meta,
        spacing=np.full((len(drawn), 3), FIELD_OF_VIEW_MM / size),
        spacing_origin="given",
    )


def make_clinical_shift_3d_seg(
    seed: int = 0,
    size: int = 32,
    patients_per_site: int = 40,
    sites: Sequence[str] | None = None,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    classes: Sequence[str] = SEG_CLASSES_3D,
) -> VolumeSegmentationDataset:
    """The built-in 3D segmentation data: the organ and its lesions (the same volumes as
    ``clinical-shift-3d`` for the same arguments). ``classes`` picks ``("organ", "lesion")``
    (default) or one of them for a binary task."""
    classes = list(classes)
    if (
        not classes
        or any(c not in SEG_CLASSES_3D for c in classes)
        or len(set(classes)) < len(classes)
    ):
        raise DataError(f"clinical-shift-3d-seg: classes must be drawn from {SEG_CLASSES_3D}")
    drawn, meta = _simulate(
        "clinical-shift-3d-seg", seed, size, patients_per_site, sites, split_fractions
    )
    lut = np.zeros(3, dtype=np.uint8)
    for j, c in enumerate(classes):
        lut[SEG_CLASSES_3D.index(c) + 1] = j + 1
    maps = np.stack([lut[d[2]] for d in drawn])
    origin = f"clinical-shift-3d(seed={seed},size={size})"
    return VolumeSegmentationDataset(
        name="clinical-shift-3d-seg",
        source=ArrayVolumes(np.stack([d[0] for d in drawn]), origin=origin),
        labels=None,  # type: ignore[arg-type]
        class_names=classes,
        modality="ct",
        metadata=meta,
        spacing=np.full((len(drawn), 3), FIELD_OF_VIEW_MM / size),
        masks=ArrayVolumeMasks(maps, len(classes), origin=f"{origin} labels"),
        areas=np.stack([class_voxels(m, len(classes)) for m in maps]),
    )


DATASETS.register("clinical-shift-3d", make_clinical_shift_3d)  # declared in datasets.json
DATASETS.register("clinical-shift-3d-seg", make_clinical_shift_3d_seg)
