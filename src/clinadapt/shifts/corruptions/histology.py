"""Histology artefacts: stain variation in H&E(-DAB) space and air bubbles (JPEG, blur shared)."""

from __future__ import annotations

import numpy as np

from clinadapt.shifts.corruptions._ops import grid
from clinadapt.shifts.corruptions.base import register_corruption

# Stain vectors of haematoxylin, eosin and DAB as optical densities per RGB channel
# (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23:291-299, 2001). Rows are stains.
RGB_FROM_HED = np.array(
    [
        [0.65, 0.70, 0.29],
        [0.07, 0.99, 0.11],
        [0.27, 0.57, 0.78],
    ]
)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_MIN_INTENSITY = 1.0 / 255.0
# PathMNIST's MedMNIST-C stain_deposit and bubble are other operations: stain and bubbles
# follow the SSIM-band rule (calibration.py); JPEG and blur are shared (xray.py).
BUBBLES = (0.058, 0.45, 0.95, 1.5, 2.1)  # bubbles, the last one partly grown


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Stain concentrations from RGB in [0, 1] by colour deconvolution of optical density."""
    od = -np.log(np.clip(rgb, _MIN_INTENSITY, 1.0))
    return od @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] from stain concentrations (inverse of :func:`rgb_to_hed`)."""
    return np.exp(-(hed @ RGB_FROM_HED))


@register_corruption("stain", (0.21, 0.43, 0.65, 0.83, 0.98), colour=True)
def stain(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """Stain variation: each stain's amount scaled and shifted (a different lab or batch).

    The scale-and-shift augmentation in HED space follows Tellez et al., IEEE TMI 2018.
    """
    sign = rng.choice([-1.0, 1.0], (2, 3))
    mag = rng.uniform(0.5, 1.0, (2, 3))
    scale, shift = sign * mag
    hed = rgb_to_hed(img)
    return hed_to_rgb(hed * (1.0 + a * scale) + a * 0.5 * shift)


@register_corruption("bubbles", BUBBLES, colour=True)
def bubbles(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Air bubbles under the coverslip: pale discs with a dark refractive rim.

    ``amount`` bubbles, the last one partly grown (its radius times the fraction); the same
    draws serve every severity, so a higher severity adds to what a lower one shows.
    """
    x, y = grid(img)
    out = img.copy()
    params = rng.uniform(0, 1, (int(np.ceil(max(BUBBLES))), 3))
    for k, (cx, cy, r) in enumerate(params):
        grown = float(np.clip(amount - k, 0.0, 1.0))
        if grown == 0.0:
            break
        cx, cy, r = 1.6 * cx - 0.8, 1.6 * cy - 0.8, (0.12 + 0.25 * r) * grown
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        inside = np.clip((r - d) / 0.03, 0, 1)[..., None]
        rim = np.exp(-((d - r) ** 2) / (2 * 0.02**2))[..., None]
        out = out * (1 - 0.7 * inside) + 0.95 * 0.7 * inside
        out = out * (1 - 0.6 * rim)
    return out
