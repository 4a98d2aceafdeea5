"""Dermoscopy artefacts: uneven lighting, colour cast and hair occlusion (blur is shared)."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import draw_curves, grid, size_scale, spatial
from clinadapt.shifts.corruptions.base import register_corruption

HAIR_COUNTS = (2, 4, 7, 10, 14)
HAIR_COLOUR = np.array([0.16, 0.1, 0.06])  # dark brown


@register_corruption("lighting", (0.2, 0.35, 0.5, 0.65, 0.8), colour=True)
def lighting(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """Light falling off across the field from a tilted or one-sided illuminator."""
    x, y = grid(img)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * x + np.sin(theta) * y) / np.sqrt(2)  # in [-1, 1]
    return img * spatial(1.0 + a * ramp, img)


@register_corruption("colour-cast", (0.08, 0.16, 0.25, 0.35, 0.5), colour=True)
def colour_cast(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """A white-balance error: each channel scaled along one random colour direction."""
    v = rng.normal(0.0, 1.0, 3)
    v -= v.mean()  # a cast, not a brightness change
    v /= np.abs(v).max() + 1e-12
    return img * (1.0 + a * v)


@register_corruption("hair", HAIR_COUNTS, colour=True)
def hair(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Dark, thin, curved hairs across the lesion; higher severities add hairs."""
    h, w = img.shape[:2]
    curves = []
    t = np.linspace(0, 1, 4 * max(h, w))[:, None]
    for _ in range(max(HAIR_COUNTS)):  # always draw all, use the first n: nested severities
        p0, p1, p2 = rng.uniform(0, 1, (3, 2)) * [h, w]
        curves.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2)
    mask = draw_curves((h, w), curves[:n], max(1.0, 2 * size_scale(img, 64)))
    return img * (1 - mask[..., None]) + HAIR_COLOUR * mask[..., None]
