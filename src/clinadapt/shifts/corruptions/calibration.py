"""How strong each severity is: mean SSIM against the clean image, and the band per severity.

Corruptions whose artefact MedMNIST-C has for the same modality take its published levels
(Di Salvo et al., "MedMNIST-C: Comprehensive benchmark and improved classifier robustness by
simulating realistic image corruptions", 2024; ``medmnistc/corruptions/registry.py`` of
github.com/francescodisalvo05/medmnistc-api). The others follow a stated rule: their mean SSIM
at severity s lies in ``SSIM_BANDS[s]``, a band around the median SSIM that MedMNIST-C's chest
X-ray levels give at that severity on the same images (contrast, gamma, Gaussian noise, blur,
JPEG, brightness down and up), so a severity means about the same amount of damage whatever
the artefact.

SSIM is MONAI's (Gaussian window of 11 pixels, sigma 1.5, data range 1), averaged over channels
and over the reference images: the first test images of the built-in clinical-shift dataset at
64 pixels, grey, or mapped to an H&E-like colour ramp for the colour corruptions.

Volume corruptions (tagged ``3d``) follow the same bands with MONAI's 3D SSIM map (a Gaussian
window of 7 voxels, sigma 1.5: an 11-voxel window covers a third of a 32^3 volume) averaged over
the body (clean voxels above the window's lowest 5%), on the first test volumes of the built-in
clinical-shift-3d data at 32^3 (5 mm voxels). The air around the body is a flat zero where the
SSIM of any noise is near 0, so an unmasked mean would rank noise far above every other artefact.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from clinadapt.shifts.corruptions.base import (
    SEVERITIES,
    corrupt,
    corrupt_volume,
    get_corruption,
)

# The X-ray corruptions with MedMNIST-C's levels, and the median of their SSIMs per severity
# on the reference images (measured; a test recomputes it). The band is +- 0.04 (at most 1).
MEDMNIST_C_XRAY = (
    "contrast",
    "gamma",
    "gaussian-noise",
    "blur",
    "jpeg",
    "underexposure",
    "overexposure",
)
SSIM_MEDIANS = (0.990, 0.961, 0.915, 0.861, 0.806)
SSIM_HALF_WIDTH = 0.04
SSIM_BANDS = {
    s: (round(m - SSIM_HALF_WIDTH, 3), min(1.0, round(m + SSIM_HALF_WIDTH, 3)))
    for s, m in zip(SEVERITIES, SSIM_MEDIANS, strict=True)
}
REFERENCE_IMAGES = 8
REFERENCE_VOLUMES = 6
VOLUME_SSIM_WINDOW = 7
# An H&E-like colour ramp for the colour corruptions: purple where dense, pink elsewhere.
_DARK, _LIGHT = np.array([0.35, 0.15, 0.45]), np.array([0.95, 0.75, 0.85])


@lru_cache(maxsize=2)
def reference_images(colour: bool = False, n: int = REFERENCE_IMAGES) -> tuple[np.ndarray, ...]:
    """The first ``n`` test images of the built-in dataset (64 px), grey or on a colour ramp."""
    from clinadapt.data.synthetic import make_clinical_shift

    test = make_clinical_shift(seed=0, patients_per_site=20).split("test")
    out = []
    for i in range(n):
        grey = test.image(i)
        if colour:
            t = grey.astype(np.float64)[..., None] / 255.0
            grey = (((1 - t) * _DARK + t * _LIGHT) * 255 + 0.5).astype(np.uint8)
        out.append(grey)
    return tuple(out)


def ssim(clean: Sequence[np.ndarray], corrupted: Sequence[np.ndarray]) -> float:
    """Mean SSIM (MONAI) of uint8 image pairs of one shape, over images and channels."""
    from monai.metrics import SSIMMetric

    def stack(imgs: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.as_tensor(np.stack(imgs), dtype=torch.float64) / 255.0
        return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)

    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5)
    return float(metric(stack(corrupted), stack(clean)).mean())


@lru_cache(maxsize=1)
def reference_volumes(n: int = REFERENCE_VOLUMES) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The first ``n`` test volumes of the built-in clinical-shift-3d data and their spacing."""
    from clinadapt.data.synthetic_3d import make_clinical_shift_3d

    test = make_clinical_shift_3d(seed=0, patients_per_site=10).split("test")
    return tuple((test.volume(i), test.spacing[i]) for i in range(n))


def ssim_volumes(clean: Sequence[np.ndarray], corrupted: Sequence[np.ndarray]) -> float:
    """Mean 3D SSIM over the body (MONAI's SSIM map, window 7, sigma 1.5, data range 1) of
    float volume pairs in [0, 1]: the map's mean over clean voxels above 0.05, per volume."""
    from monai.metrics.regression import compute_ssim_and_cs

    w, half = VOLUME_SSIM_WINDOW, VOLUME_SSIM_WINDOW // 2
    scores = []
    for a, b in zip(clean, corrupted, strict=True):
        x = torch.as_tensor(np.asarray(a), dtype=torch.float32)[None, None]
        y = torch.as_tensor(np.asarray(b), dtype=torch.float32)[None, None]
        ssim_map, _ = compute_ssim_and_cs(y, x, 3, [w] * 3, [1.5] * 3, data_range=1.0)
        inner = x[0, 0, half:-half, half:-half, half:-half]  # the map is "valid": cropped
        body = inner > 0.05
        m = ssim_map[0, 0]
        scores.append(float(m[body].mean()) if body.any() else float(m.mean()))
    return float(np.mean(scores))


def ssim_by_severity(name: str, seed: int = 0) -> list[float]:
    """Mean SSIM of corruption ``name`` at severities 1..5 on the reference images (volumes)."""
    c = get_corruption(name)
    if c.dims == 3:
        vols = reference_volumes()
        clean = [v for v, _ in vols]
        return [
            ssim_volumes(
                clean, [corrupt_volume(v, name, s, seed, i, sp) for i, (v, sp) in enumerate(vols)]
            )
            for s in SEVERITIES
        ]
    images = reference_images(c.colour)
    return [
        ssim(images, [corrupt(im, name, s, seed, position=i) for i, im in enumerate(images)])
        for s in SEVERITIES
    ]
