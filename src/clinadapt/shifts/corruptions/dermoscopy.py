"""Dermoscopy artefacts: uneven lighting, colour cast and hair occlusion (blur is shared)."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import draw_curves, grid, size_scale, spatial
from clinadapt.shifts.corruptions.base import register_corruption

# DermaMNIST's MedMNIST-C artefacts (noise, blurs, brightness, black corner, characters) are
# not these: all levels here follow the SSIM-band rule (calibration.py).
HAIR_LENGTHS = (0.002, 0.15, 0.6, 1.05, 1.85)  # image sides of hair
HAIR_COLOUR = np.array([0.16, 0.1, 0.06])  # dark brown


@register_corruption("lighting", (0.21, 0.42, 0.63, 0.81, 0.98), colour=True)
def lighting(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """Light falling off across the field from a tilted or one-sided illuminator."""
    x, y = grid(img)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * x + np.sin(theta) * y) / np.sqrt(2)  # in [-1, 1]
    return img * spatial(1.0 + a * ramp, img)


@register_corruption("colour-cast", (0.14, 0.27, 0.40, 0.51, 0.61), colour=True)
def colour_cast(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """A white-balance error: each channel scaled along one random colour direction."""
    v = rng.normal(0.0, 1.0, 3)
    v -= v.mean()  # a cast, not a brightness change
    v /= np.abs(v).max() + 1e-12
    return img * (1.0 + a * v)


@register_corruption("hair", HAIR_LENGTHS, colour=True)
def hair(img: np.ndarray, length: float, rng: np.random.Generator) -> np.ndarray:
    """Dark, thin, curved hairs across the lesion; higher severities add hairs.

    ``length`` image sides of hair in all: hairs are drawn whole, one after another, the last one in part; the same draws serve every
    severity, so a higher severity adds hair to what a lower one shows.
    """
    h, w = img.shape[:2]
    curves = []
    t = np.linspace(0, 1, 4 * max(h, w))[:, None]
    for k in range(int(np.ceil(max(HAIR_LENGTHS)))):
        p0, p1, p2 = rng.uniform(0, 1, (3, 2)) * [h, w]
        part = t[: round(len(t) * np.clip(length - k, 0.0, 1.0))]
        curves.append((1 - part) ** 2 * p0 + 2 * (1 - part) * part * p1 + part**2 * p2)
    mask = draw_curves((h, w), [c for c in curves if len(c)], max(1.0, 2 * size_scale(img, 64)))
    return img * (1 - mask[..., None]) + HAIR_COLOUR * mask[..., None]
