"""CT artefacts: low-dose noise, metal streaks, detector rings and a wrong display window."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import blur, grid, size_scale, spatial
from clinadapt.shifts.corruptions.base import register_corruption


# Amplitudes of MedMNIST-C's Gaussian noise for its CT sets (OrganA/C/SMNIST); the noise itself
# is correlated, as filtered back-projection makes it. The other CT artefacts follow the
# SSIM-band rule (calibration.py).
@register_corruption(
    "ct-noise",
    (0.04, 0.08, 0.12, 0.16, 0.2),
    calibration="MedMNIST-C OrganAMNIST gaussian_noise (amplitude)",
)
def ct_noise(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Low-dose noise: filtered back-projection makes it spatially correlated, not white."""
    n = blur(rng.normal(0.0, 1.0, img.shape[:2]), 0.7 * max(1.0, 4 * size_scale(img)))
    n /= n.std() + 1e-12
    return img + spatial(n, img) * c


@register_corruption("streak", (0.029, 0.062, 0.10, 0.15, 0.20))
def streak(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """Bright and dark streaks through a dense object (metal / photon starvation)."""
    x, y = grid(img)
    cx, cy = rng.uniform(-0.4, 0.4, 2)
    field = np.zeros(img.shape[:2])
    width = 2.0 / img.shape[0]
    for k, theta in enumerate(rng.uniform(0, np.pi, 6)):
        d = (x - cx) * np.sin(theta) - (y - cy) * np.cos(theta)  # distance to the line
        field += (1 if k % 2 == 0 else -1) * np.exp(-(d**2) / (2 * width**2))
    return img + spatial(field, img) * a


@register_corruption("ring", (0.016, 0.034, 0.054, 0.074, 0.095))
def ring(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """Concentric rings around the rotation centre (a miscalibrated detector element)."""
    x, y = grid(img)
    r = np.sqrt(x**2 + y**2)
    field = np.zeros(img.shape[:2])
    width = 1.5 / img.shape[0]
    for radius, sign in zip(rng.uniform(0.1, 0.9, 8), rng.choice([-1, 1], 8), strict=True):
        field += sign * np.exp(-((r - radius) ** 2) / (2 * width**2))
    return img + spatial(field, img) * a


@register_corruption(
    "windowing",
    ((0.028, 0.92), (0.051, 0.86), (0.076, 0.80), (0.097, 0.74), (0.11, 0.70)),
)
def windowing(img: np.ndarray, lw: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A wrong window: level moved by ``l`` (up or down) and width shrunk to ``w`` of the range."""
    level, width = lw
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return (img - 0.5 - sign * level) / width + 0.5
