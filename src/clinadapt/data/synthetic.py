"""The built-in clinical-shift dataset: chest-radiograph-like images from several simulated sites.

Every image is drawn from a seed, so the dataset is identical on every machine and needs no
download. Each image shows simple chest anatomy (body, two lung fields, ribs, spine, soft-tissue
texture) and at most one finding. Each site acquires the same kind of patients through its own
"scanner", which differs the way real sites do: contrast and gamma, noise, blur and resolution,
intensity drift and a bias field. A model trained on one site therefore measurably drops on the
others, which is what the rest of the toolkit is meant to measure and recover.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from clinadapt.data.base import META_KEYS, ArraySource, ClinicalDataset
from clinadapt.data.registry import DATASETS
from clinadapt.errors import DataError

CLASS_NAMES = ["normal", "nodule", "consolidation", "effusion"]


@dataclass(frozen=True)
class SiteProfile:
    """How one site's scanner turns anatomy into pixels."""

    scanner: str
    contrast: float = 1.0  # gain around mid-grey
    gamma: float = 1.0
    offset: float = 0.0  # intensity drift
    bias_field: float = 0.0  # amplitude of a smooth left-right/top-bottom gradient
    noise: float = 0.02  # std of additive Gaussian noise (intensity units in [0,1])
    blur: float = 0.0  # Gaussian blur sigma, in pixels at 64x64
    downsample: int = 1  # acquired at 1/downsample resolution, then upsampled
    prevalence: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)
    female_fraction: float = 0.5
    old_fraction: float = 0.4


SITES: dict[str, SiteProfile] = {
    # The reference site: a modern DR system, good contrast, little noise.
    "site-a": SiteProfile(scanner="dr-vendor-1"),
    # An older computed-radiography unit: flat contrast, a darker gamma curve and more noise.
    "site-b": SiteProfile(
        scanner="cr-vendor-2",
        contrast=0.6,
        gamma=1.5,
        noise=0.045,
        prevalence=(0.3, 0.25, 0.25, 0.2),
        female_fraction=0.6,
        old_fraction=0.6,
    ),
    # Portable bedside images: blurred, acquired at half resolution, more scatter (less contrast).
    "site-c": SiteProfile(
        scanner="portable-vendor-3",
        contrast=0.8,
        offset=0.05,
        blur=1.5,
        downsample=2,
        noise=0.03,
        prevalence=(0.25, 0.15, 0.3, 0.3),
        female_fraction=0.45,
        old_fraction=0.7,
    ),
    # A different vendor's processing: brighter, harder contrast and an uneven field.
    "site-d": SiteProfile(
        scanner="dr-vendor-4",
        contrast=1.35,
        offset=0.12,
        bias_field=0.15,
        noise=0.03,
        prevalence=(0.45, 0.2, 0.15, 0.2),
        female_fraction=0.5,
        old_fraction=0.3,
    ),
}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="xy")  # x: left->right, y: top->bottom


def _ellipse(x, y, cx, cy, rx, ry, soft):
    r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / soft, -60.0, 60.0)))


def _anatomy(rng: np.random.Generator, size: int, old: bool) -> dict:
    """Per-patient anatomy parameters (shared by all images of that patient)."""
    return {
        "scale": rng.uniform(0.9, 1.08),
        "dx": rng.uniform(-0.05, 0.05),
        "dy": rng.uniform(-0.05, 0.05),
        "rib_freq": rng.uniform(9.0, 12.0),
        "rib_phase": rng.uniform(0, 2 * np.pi),
        "bone": rng.uniform(0.07, 0.11) * (0.75 if old else 1.0),
        "lung": rng.uniform(0.16, 0.24),
        "texture_seed": int(rng.integers(2**31)),
    }


def _chest(
    rng: np.random.Generator, size: int, anat: dict, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], tuple[float, float, float]]:
    """The anatomy of one image: attenuation map, the two soft lung fields, (scale, dx, dy)."""
    s, dx, dy = anat["scale"], anat["dx"] + rng.normal(0, 0.015), anat["dy"] + rng.normal(0, 0.015)
    body = _ellipse(x, y, dx, dy + 0.05, 0.92 * s, 1.0 * s, 0.08)
    lungs = []
    for side in (-1, 1):
        lungs.append(_ellipse(x, y, dx + side * 0.38 * s, dy - 0.05, 0.28 * s, 0.62 * s, 0.05))
    lung = np.clip(lungs[0] + lungs[1], 0, 1)
    img = 0.12 + 0.5 * body - (0.5 - anat["lung"]) * lung
    ribs = 0.5 + 0.5 * np.sin(anat["rib_freq"] * (y - 0.25 * np.abs(x - dx)) + anat["rib_phase"])
    img += anat["bone"] * (ribs**4) * body
    img += 0.3 * np.exp(-(((x - dx) / (0.08 * s)) ** 2)) * body  # spine / mediastinum
    tex_rng = np.random.default_rng(anat["texture_seed"])
    texture = gaussian_filter(tex_rng.normal(0, 1, (size, size)).astype(np.float32), size / 40)
    img += 0.035 * texture / (texture.std() + 1e-6) * lung
    return img, lungs, (s, dx, dy)


def _draw(
    rng: np.random.Generator, size: int, anat: dict, label: int, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation map in [0,1] for one image with its finding, and the lung fields."""
    img, lungs, (s, dx, dy) = _chest(rng, size, anat, x, y)
    lung = np.clip(lungs[0] + lungs[1], 0, 1)
    side = rng.integers(2)
    lcx = dx + (-1 if side == 0 else 1) * 0.38 * s
    if label == 1:  # nodule: a small dense round opacity inside one lung
        cx = lcx + rng.uniform(-0.14, 0.14) * s
        cy = dy - 0.05 + rng.uniform(-0.35, 0.3) * s
        r = rng.uniform(0.07, 0.11) * s
        img += rng.uniform(0.22, 0.3) * _ellipse(x, y, cx, cy, r, r, 0.08)
    elif label == 2:  # consolidation: a large, soft, ill-defined opacity
        cx = lcx + rng.uniform(-0.1, 0.1) * s
        cy = dy - 0.05 + rng.uniform(-0.25, 0.25) * s
        sig = rng.uniform(0.16, 0.24) * s
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * sig**2)))
        img += rng.uniform(0.18, 0.26) * blob * lungs[side]
    elif label == 3:  # effusion: fluid filling the base of one lung, with a meniscus
        level = dy - 0.05 + rng.uniform(0.1, 0.35) * s
        meniscus = level - 0.12 * ((x - lcx) / (0.28 * s)) ** 2 * (1 if side == 0 else -1) * (
            x - lcx
        )
        fluid = 1.0 / (1.0 + np.exp(np.clip(-(y - meniscus) / 0.03, -60.0, 60.0)))
        img += rng.uniform(0.2, 0.28) * fluid * lungs[side]
    return img, lung


def _acquire(rng: np.random.Generator, img: np.ndarray, site: SiteProfile, x, y) -> np.ndarray:
    """Apply one site's scanner to an attenuation map; returns uint8 pixels."""
    size = img.shape[0]
    k = size / 64.0
    if site.downsample > 1:
        small = zoom(img, 1.0 / site.downsample, order=1)
        img = zoom(small, size / small.shape[0], order=1)[:size, :size]
    if site.blur > 0:
        img = gaussian_filter(img, site.blur * k)
    img = np.clip(img, 0, 1) ** site.gamma
    img = 0.5 + site.contrast * (img - 0.5) + site.offset
    if site.bias_field:
        angle = rng.uniform(0, 2 * np.pi)
        img = img + site.bias_field * (np.cos(angle) * x + np.sin(angle) * y)
    img = img + rng.normal(0, site.noise, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


PatientFn = Callable[[np.random.Generator, str], dict[str, Any]]
ImageFn = Callable[[np.random.Generator, str, dict[str, Any]], Any]


def simulate_sites(
    name: str,
    seed: int,
    size: int,
    patients_per_site: int,
    images_per_patient: tuple[int, int],
    sites: Sequence[str] | None,
    split_fractions: tuple[float, float, float],
    patient: PatientFn,
    image: ImageFn,
    profiles: dict[str, Any] | None = None,
    min_size: int = 32,
) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Draw patients site by site and their images; return the images and per-image metadata.

    ``patient(rng, site_name)`` draws one patient (its dict must hold ``female`` and ``old``);
    ``image(rng, site_name, patient)`` draws one of its images. Splits are drawn per patient, so no
    patient crosses a split; each site has its own random stream, so changing one site's size
    leaves the others unchanged. ``profiles`` are the sites (default :data:`SITES`); each has a
    ``scanner`` name.
    """
    profiles = SITES if profiles is None else profiles
    sites = list(sites) if sites is not None else list(profiles)
    unknown = [s for s in sites if s not in profiles]
    if unknown:
        raise DataError(f"{name}: unknown site(s) {unknown}; known: {list(profiles)}")
    if size < min_size:
        raise DataError(f"{name}: size must be at least {min_size}, got {size}")
    if patients_per_site < 5:
        raise DataError(f"{name}: patients_per_site must be >= 5, got {patients_per_site}")
    lo, hi = images_per_patient
    if not 1 <= lo <= hi:
        raise DataError(
            f"{name}: images_per_patient must be 1 <= lo <= hi, got {images_per_patient}"
        )
    if abs(sum(split_fractions) - 1.0) > 1e-6 or min(split_fractions) < 0:
        raise DataError(f"{name}: split_fractions must be >= 0 and sum to 1, got {split_fractions}")
    images: list[Any] = []
    meta: dict[str, list[str]] = {k: [] for k in META_KEYS}
    streams = np.random.SeedSequence(seed).spawn(len(profiles))
    for site_name in sites:
        site = profiles[site_name]
        rng = np.random.default_rng(streams[list(profiles).index(site_name)])
        order = rng.permutation(patients_per_site)
        n_tr = round(split_fractions[0] * patients_per_site)
        n_va = round(split_fractions[1] * patients_per_site)
        split_of = np.empty(patients_per_site, dtype=object)
        split_of[order[:n_tr]] = "train"
        split_of[order[n_tr : n_tr + n_va]] = "val"
        split_of[order[n_tr + n_va :]] = "test"
        for p in range(patients_per_site):
            state = patient(rng, site_name)
            for _ in range(int(rng.integers(lo, hi + 1))):
                images.append(image(rng, site_name, state))
                meta["split"].append(split_of[p])
                meta["domain"].append(site_name)
                meta["scanner"].append(site.scanner)
                meta["sex"].append("F" if state["female"] else "M")
                meta["age_group"].append("65+" if state["old"] else "18-64")
                meta["patient_id"].append(f"{site_name}-p{p:04d}")
    return images, {k: np.asarray(v) for k, v in meta.items()}


def make_clinical_shift(
    seed: int = 0,
    size: int = 64,
    patients_per_site: int = 200,
    images_per_patient: tuple[int, int] = (1, 3),
    sites: tuple[str, ...] | list[str] | None = None,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> ClinicalDataset:
    """Generate the built-in clinical-shift dataset (deterministic from ``seed``).

    Splits (train/val/test) are drawn per patient, so no patient crosses a split. Metadata:
    split, domain (site), scanner, sex, age_group and patient_id.
    """
    x, y = _grid(size)

    def patient(rng: np.random.Generator, site_name: str) -> dict[str, Any]:
        site = SITES[site_name]
        label = int(rng.choice(len(CLASS_NAMES), p=site.prevalence))
        female = rng.random() < site.female_fraction
        old = rng.random() < site.old_fraction
        return {"label": label, "female": female, "old": old, "anat": _anatomy(rng, size, old)}

    def image(rng: np.random.Generator, site_name: str, p: dict[str, Any]) -> tuple:
        att, _lung = _draw(rng, size, p["anat"], p["label"], x, y)
        return _acquire(rng, att, SITES[site_name], x, y), p["label"]

    drawn, meta = simulate_sites(
        "clinical-shift",
        seed,
        size,
        patients_per_site,
        images_per_patient,
        sites,
        split_fractions,
        patient,
        image,
    )
    return ClinicalDataset(
        name="clinical-shift",
        source=ArraySource(
            np.stack([d[0] for d in drawn]), origin=f"clinical-shift(seed={seed},size={size})"
        ),
        labels=np.asarray([d[1] for d in drawn]),
        class_names=list(CLASS_NAMES),
        task="multiclass",
        modality="xray",
        metadata=meta,
    )


DATASETS.register("clinical-shift", make_clinical_shift)  # declared in datasets.json
