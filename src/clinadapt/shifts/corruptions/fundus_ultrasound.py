"""Fundus, ultrasound and OCT artefacts: speckle and vignetting."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import grid, spatial
from clinadapt.shifts.corruptions.base import register_corruption


# MedMNIST-C's speckle for its ultrasound set, BreastMNIST (OCTMNIST's run 0.15 to 0.6); the
# same operation, img (1 + N(0, c)). Vignetting follows the SSIM-band rule (calibration.py).
@register_corruption(
    "speckle",
    (0.10, 0.15, 0.20, 0.25, 0.30),
    calibration="MedMNIST-C BreastMNIST speckle_noise",
)
def speckle(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative speckle from coherent interference of the echoes."""
    return img * (1.0 + rng.normal(0.0, 1.0, img.shape) * c)


@register_corruption("vignetting", (0.18, 0.35, 0.51, 0.64, 0.75))
def vignetting(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """Dark periphery from a small pupil or misaligned camera (or probe contact loss)."""
    x, y = grid(img)
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / 2.0
    return img * spatial(np.clip(1.0 - a * r2 * 1.6, 0.0, 1.0), img)
