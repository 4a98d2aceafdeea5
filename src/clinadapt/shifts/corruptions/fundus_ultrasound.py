"""Fundus, ultrasound and OCT artefacts: speckle and vignetting."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import grid, spatial
from clinadapt.shifts.corruptions.base import register_corruption


# Levels of ImageNet-C's speckle noise (Hendrycks & Dietterich, ICLR 2019).
@register_corruption("speckle", (0.15, 0.2, 0.35, 0.45, 0.6))
def speckle(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative speckle from coherent interference of the echoes."""
    return img * (1.0 + rng.normal(0.0, 1.0, img.shape) * c)


@register_corruption("vignetting", (0.25, 0.4, 0.55, 0.7, 0.85))
def vignetting(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """Dark periphery from a small pupil or misaligned camera (or probe contact loss)."""
    x, y = grid(img)
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / 2.0
    return img * spatial(np.clip(1.0 - a * r2 * 1.6, 0.0, 1.0), img)
