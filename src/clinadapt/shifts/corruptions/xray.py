"""X-ray acquisition artefacts: contrast, gamma, noise, blur, JPEG, under- and over-exposure."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import blur, jpeg, size_scale
from clinadapt.shifts.corruptions.base import register_corruption

# Levels of contrast, gaussian-noise, blur and jpeg are those of ImageNet-C
# (Hendrycks & Dietterich, ICLR 2019, github.com/hendrycks/robustness).


@register_corruption("contrast", (0.4, 0.3, 0.2, 0.1, 0.05))
def contrast(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Flatten contrast around the image mean (a mis-set detector gain)."""
    m = img.mean(axis=(0, 1), keepdims=True)
    return (img - m) * c + m


@register_corruption("gamma", (1.4, 1.8, 2.3, 2.9, 3.6))
def gamma(img: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    """A wrong gamma curve in post-processing (darker mid-tones)."""
    return np.clip(img, 0, 1) ** g


@register_corruption("gaussian-noise", (0.08, 0.12, 0.18, 0.26, 0.38))
def gaussian_noise(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise (electronic detector noise)."""
    return img + rng.normal(0.0, 1.0, img.shape) * c


@register_corruption("blur", (1, 2, 3, 4, 6))
def gaussian_blur(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (focal-spot size, patient motion or defocus); sigma scales with size."""
    # At most halved below 224 pixels: a smaller sigma would vanish in 8-bit rounding.
    return blur(img, c * max(size_scale(img), 0.5))


@register_corruption("jpeg", (25, 18, 15, 10, 7))
def jpeg_compression(img: np.ndarray, q: int, rng: np.random.Generator) -> np.ndarray:
    """Lossy JPEG compression at falling quality (PACS export, teleradiology)."""
    return jpeg(img, q)


@register_corruption("underexposure", (0.75, 0.6, 0.45, 0.32, 0.2))
def underexposure(img: np.ndarray, f: float, rng: np.random.Generator) -> np.ndarray:
    """Too few photons: a darker image with more quantum (Poisson-like) noise."""
    noise = rng.normal(0.0, 1.0, img.shape) * 0.04 * np.sqrt(1.0 / f - 1.0 + 1e-12)
    return img * f + noise * np.sqrt(np.clip(img * f, 0, 1))


@register_corruption("overexposure", (1.3, 1.6, 2.0, 2.5, 3.2))
def overexposure(img: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    """Too many photons: bright regions saturate and detail burns out."""
    return np.clip(img * g, 0, 1)
