"""MRI artefacts: bias field, ghosting, motion and Rician noise (the last three via k-space)."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import grid, spatial
from clinadapt.shifts.corruptions.base import register_corruption


def _per_channel(img: np.ndarray, fn) -> np.ndarray:
    if img.ndim == 2:
        return fn(img)
    return np.stack([fn(img[..., c]) for c in range(img.shape[-1])], axis=-1)


# MedMNIST-C has no MRI set: every level here follows the SSIM-band rule (calibration.py).
@register_corruption("bias-field", (0.39, 0.76, 1.2, 1.6, 2.1))
def bias_field(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative intensity inhomogeneity (receive-coil sensitivity)."""
    x, y = grid(img)
    coef = rng.normal(0.0, 1.0, 6)
    field = coef[0] * x + coef[1] * y + coef[2] * x * y + coef[3] * x**2 + coef[4] * y**2
    field += coef[5] * (x**3 - y**3)
    field /= np.abs(field).max() + 1e-12
    return img * spatial(np.exp(a * field), img)


@register_corruption("ghosting", (0.13, 0.23, 0.33, 0.42, 0.48))
def ghosting(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """N/2 ghosts: every other phase-encoding line scaled (periodic motion, EPI mismatch)."""
    axis = int(rng.integers(0, 2))

    def one(ch: np.ndarray) -> np.ndarray:
        k = np.fft.fft2(ch)
        sl = [slice(None), slice(None)]
        sl[axis] = slice(0, None, 2)
        k[tuple(sl)] *= 1.0 - a
        return np.abs(np.fft.ifft2(k)) / (1.0 - a / 2)

    return _per_channel(img, one)


@register_corruption("motion", ((0.22, 0.88), (0.26, 2.2), (0.30, 4.1), (0.35, 6.0), (0.37, 6.9)))
def motion(img: np.ndarray, pm: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Rigid shifts during acquisition: a fraction of k-space lines get a phase ramp."""
    frac, shift = pm
    h, w = img.shape[:2]
    hit = rng.random(h) < frac
    shifts = rng.uniform(-1.0, 1.0, h) * shift * max(h, w) / 64
    ramp = np.exp(-2j * np.pi * np.fft.fftfreq(w)[None, :] * (shifts * hit)[:, None])

    def one(ch: np.ndarray) -> np.ndarray:
        return np.abs(np.fft.ifft2(np.fft.fft2(ch) * ramp))

    return _per_channel(img, one)


@register_corruption("rician-noise", (0.0084, 0.017, 0.027, 0.036, 0.045))
def rician_noise(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of complex Gaussian noise: biased upwards in dark regions, as in MR images."""
    n1 = rng.normal(0.0, 1.0, img.shape)
    n2 = rng.normal(0.0, 1.0, img.shape)
    return np.sqrt((img + s * n1) ** 2 + (s * n2) ** 2)
