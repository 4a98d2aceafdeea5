"""X-ray acquisition artefacts: contrast, gamma, noise, blur, JPEG, under- and over-exposure."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import blur, jpeg, size_scale
from clinadapt.shifts.corruptions.base import register_corruption

# Levels are MedMNIST-C's for its chest X-ray sets, ChestMNIST and PneumoniaMNIST (Di Salvo et
# al. 2024, medmnistc/corruptions/registry.py of github.com/francescodisalvo05/medmnistc-api),
# with the same operations: PIL's contrast and brightness enhancers (a blend with the mean grey,
# a scaling), torchvision's adjust_gamma, additive Gaussian noise, JPEG quality and Gaussian
# blur. They were set on 224-pixel images: per-pixel operations carry over at any size, blur
# widths scale with the image side (see ``blur``).
CHEST = "MedMNIST-C ChestMNIST/PneumoniaMNIST"


@register_corruption("contrast", (0.9, 0.8, 0.7, 0.6, 0.4), calibration=f"{CHEST} contrast_down")
def contrast(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Flatten contrast around the image mean (a mis-set detector gain)."""
    m = img.mean(axis=(0, 1), keepdims=True)
    return (img - m) * c + m


@register_corruption("gamma", (1.1, 1.2, 1.3, 1.4, 1.6), calibration=f"{CHEST} gamma_corr_up")
def gamma(img: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    """A wrong gamma curve in post-processing (darker mid-tones)."""
    return np.clip(img, 0, 1) ** g


# ChestMNIST's noise levels; PneumoniaMNIST's are narrower (0.04 to 0.08).
@register_corruption(
    "gaussian-noise",
    (0.04, 0.08, 0.12, 0.18, 0.26),
    calibration="MedMNIST-C ChestMNIST gaussian_noise",
)
def gaussian_noise(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise (electronic detector noise)."""
    return img + rng.normal(0.0, 1.0, img.shape) * c


# MedMNIST-C blurs chest X-rays with torchvision's gaussian_blur, kernels 3, 5, 7, 9 and 11,
# whose default sigma is 0.3 ((k - 1) / 2 - 1) + 0.8: 0.8, 1.1, 1.4, 1.7 and 2.0 pixels at 224.
@register_corruption(
    "blur",
    (0.8, 1.1, 1.4, 1.7, 2.0),
    calibration=f"{CHEST} gaussian_blur",
)
def gaussian_blur(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (focal-spot size, patient motion or defocus); sigma scales with size."""
    # At most halved below 224 pixels: a smaller sigma would vanish in 8-bit rounding.
    return blur(img, c * max(size_scale(img), 0.5))


@register_corruption(
    "jpeg",
    (50, 30, 15, 10, 7),
    calibration=f"{CHEST} (and PathMNIST) jpeg_compression",
)
def jpeg_compression(img: np.ndarray, q: int, rng: np.random.Generator) -> np.ndarray:
    """Lossy JPEG compression at falling quality (PACS export, teleradiology)."""
    return jpeg(img, q)


@register_corruption(
    "underexposure",
    (0.9, 0.8, 0.7, 0.6, 0.5),
    calibration=f"{CHEST} brightness_down (plus quantum noise)",
)
def underexposure(img: np.ndarray, f: float, rng: np.random.Generator) -> np.ndarray:
    """Too few photons: a darker image with more quantum (Poisson-like) noise."""
    noise = rng.normal(0.0, 1.0, img.shape) * 0.04 * np.sqrt(1.0 / f - 1.0 + 1e-12)
    return img * f + noise * np.sqrt(np.clip(img * f, 0, 1))


@register_corruption(
    "overexposure", (1.1, 1.2, 1.3, 1.4, 1.5), calibration=f"{CHEST} brightness_up"
)
def overexposure(img: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    """Too many photons: bright regions saturate and detail burns out."""
    return np.clip(img * g, 0, 1)
