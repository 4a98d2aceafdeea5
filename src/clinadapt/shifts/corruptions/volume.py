"""Acquisition artefacts of volumes (MRI and CT) at five severities.

MRI bias field, ghosting, motion and spikes are TorchIO's own transforms (``BiasField``,
``Ghosting``, ``Motion``, ``Spike``: the k-space simulations of Pérez-García et al., 2021, and
Shaw et al., 2019, for motion). Each volume draws its random
parameters (field coefficients, ghost axis, motion times and directions, spike positions) once
from its own generator, the same at every severity, so a severity only scales the artefact: a
higher severity is never milder by chance. Rician noise and the CT artefacts (correlated
low-dose noise, metal streaks, detector rings, beam hardening) have no TorchIO counterpart and
are written here, as are thick slices (see there why not TorchIO's RandomAnisotropy); Rician
noise is checked against its closed form in the tests.

Levels follow the SSIM-band rule of the 2D artefacts (``calibration``): the mean 3D SSIM of
severity s over the body of the reference volumes lies in ``SSIM_BANDS[s]`` (found by
``benchmarks/corruption_severities.py --dims 3 --search``); thick slices use physical thickness
factors instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d, label

from clinadapt.shifts.corruptions.base import register_corruption

SLICE_AXIS = 2  # RAS+: the axial slices run along axis 2


def _torchio(volume: np.ndarray, spacing: Sequence[float], transform: Any) -> np.ndarray:
    """Run a TorchIO transform on one volume (its affine carries the voxel spacing)."""
    import torch
    import torchio as tio

    affine = np.diag([*spacing, 1.0])
    image = tio.ScalarImage(
        tensor=torch.as_tensor(volume, dtype=torch.float32)[None], affine=affine
    )
    out = transform(tio.Subject(image=image))
    return out["image"].data[0].numpy().astype(np.float64)


def _grid(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in [-1, 1] along x, y and z."""
    axes = [np.linspace(-1.0, 1.0, n) for n in volume.shape]
    return tuple(np.meshgrid(*axes, indexing="ij"))  # type: ignore[return-value]


# --- MRI ------------------------------------------------------------------------------------


@register_corruption("bias-field-3d", (0.092, 0.18, 0.28, 0.38, 0.48))
def bias_field_3d(vol: np.ndarray, a: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """A smooth multiplicative field: TorchIO BiasField, order 3, coefficients scaled by ``a``."""
    from torchio.transforms.augmentation.intensity.random_bias_field import BiasField

    coefficients = (a * rng.uniform(-1.0, 1.0, 20)).tolist()  # order 3: 20 monomials
    return _torchio(vol, spacing, BiasField(coefficients=coefficients, order=3))


@register_corruption("ghosting-3d", (0.23, 0.44, 0.65, 0.84, 1.0))
def ghosting_3d(vol: np.ndarray, a: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Periodic-motion ghosts along a phase-encoding axis: TorchIO Ghosting at intensity ``a``."""
    from torchio.transforms.augmentation.intensity.random_ghosting import Ghosting

    num = int(rng.integers(4, 11))  # TorchIO's default range of ghosts
    axis = int(rng.integers(0, 3))
    return _torchio(vol, spacing, Ghosting(num_ghosts=num, axis=axis, intensity=a, restore=0.02))


@register_corruption("motion-3d", (0.95, 1.6, 3.3, 6.2, 11.0))
def motion_3d(vol: np.ndarray, a: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Rigid head/body movements during the scan: TorchIO Motion (two movements, each up to
    ``a`` degrees and ``a`` mm per axis)."""
    from torchio.transforms.augmentation.intensity.random_motion import Motion

    n = 2
    times = np.sort(rng.uniform(0.2, 0.8, n))
    degrees = a * rng.uniform(-1.0, 1.0, (n, 3))
    translation = a * rng.uniform(-1.0, 1.0, (n, 3))
    motion = Motion(
        degrees=degrees, translation=translation, times=times, image_interpolation="linear"
    )
    return _torchio(vol, spacing, motion)


@register_corruption("spike-3d", (0.079, 0.16, 0.26, 0.36, 0.47))
def spike_3d(vol: np.ndarray, a: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Herringbone stripes from a k-space spike: TorchIO Spike at intensity ``a``."""
    from torchio.transforms.augmentation.intensity.random_spike import Spike

    positions = rng.random((int(rng.integers(1, 3)), 3))
    return _torchio(vol, spacing, Spike(spikes_positions=positions, intensity=a))


@register_corruption("rician-noise-3d", (0.01, 0.021, 0.033, 0.047, 0.06))
def rician_noise_3d(vol: np.ndarray, s: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Magnitude of complex Gaussian noise of std ``s`` (as in a magnitude MR reconstruction):
    sqrt((v + s n1)^2 + (s n2)^2), biased upwards where the signal is low."""
    n1 = rng.normal(0.0, 1.0, vol.shape)
    n2 = rng.normal(0.0, 1.0, vol.shape)
    return np.sqrt((vol + s * n1) ** 2 + (s * n2) ** 2)


# --- CT -------------------------------------------------------------------------------------


@register_corruption("ct-noise-3d", (0.011, 0.023, 0.036, 0.051, 0.067))
def ct_noise_3d(vol: np.ndarray, c: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Low-dose noise: spatially correlated in-plane (filtered back-projection) with std ``c``."""
    n = gaussian_filter(rng.normal(0.0, 1.0, vol.shape), (0.8, 0.8, 0.4))
    return vol + c * n / (n.std() + 1e-12)


@register_corruption("streak-3d", (0.036, 0.08, 0.14, 0.21, 0.3))
def streak_3d(vol: np.ndarray, a: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Metal streaks: bright and dark lines radiating in-plane from a dense point, over the
    slices around it (fading with the distance in z)."""
    x, y, z = _grid(vol)
    cx, cy, cz = rng.uniform(-0.4, 0.4, 3)
    width = 2.0 / vol.shape[0]
    field = np.zeros(vol.shape)
    for k, theta in enumerate(rng.uniform(0.0, np.pi, 6)):
        d = (x - cx) * np.sin(theta) - (y - cy) * np.cos(theta)
        field += (1.0 if k % 2 == 0 else -1.0) * np.exp(-(d**2) / (2 * width**2))
    extent = rng.uniform(0.2, 0.4)
    return vol + a * field * np.exp(-((z - cz) ** 2) / (2 * extent**2))


@register_corruption("ring-3d", (0.018, 0.038, 0.061, 0.086, 0.11))
def ring_3d(vol: np.ndarray, a: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Detector-ring artefacts: concentric rings around the rotation axis, through every slice."""
    x, y, _ = _grid(vol)
    r = np.sqrt(x**2 + y**2)
    width = 1.5 / vol.shape[0]
    field = np.zeros(vol.shape)
    for radius, sign in zip(rng.uniform(0.1, 0.9, 8), rng.choice([-1.0, 1.0], 8), strict=True):
        field += sign * np.exp(-((r - radius) ** 2) / (2 * width**2))
    return vol + a * field


@register_corruption("beam-hardening-3d", (0.049, 0.096, 0.14, 0.19, 0.22))
def beam_hardening_3d(vol: np.ndarray, a: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Beam hardening: cupping (the centre of the body darker than its rim, by ``a`` at the
    centre) and a dark band between the two densest structures of each slice."""
    x, y, _ = _grid(vol)
    body = vol > 0.05
    out = vol.copy()
    for k in range(vol.shape[SLICE_AXIS]):
        inside = body[:, :, k]
        if inside.sum() < 4:
            continue
        px, py = x[:, :, k][inside], y[:, :, k][inside]
        cx, cy = px.mean(), py.mean()
        rmax = np.sqrt((px - cx) ** 2 + (py - cy) ** 2).max() + 1e-6
        r = np.sqrt((x[:, :, k] - cx) ** 2 + (y[:, :, k] - cy) ** 2) / rmax
        out[:, :, k] -= a * np.clip(1.0 - r**2, 0.0, 1.0) * inside
    dense = vol > np.quantile(vol, 0.98)
    parts, n = label(dense)
    if n >= 2:
        sizes = np.bincount(parts.ravel())[1:]
        first, second = np.argsort(sizes)[-2:] + 1
        c1 = np.array([g[parts == first].mean() for g in (x, y)])
        c2 = np.array([g[parts == second].mean() for g in (x, y)])
        direction = (c2 - c1) / (np.linalg.norm(c2 - c1) + 1e-9)
        along = (x - c1[0]) * direction[0] + (y - c1[1]) * direction[1]
        across = (x - c1[0]) * direction[1] - (y - c1[1]) * direction[0]
        length = np.linalg.norm(c2 - c1)
        band = np.exp(-(across**2) / (2 * (2.0 / vol.shape[0]) ** 2))
        band *= (along > 0) & (along < length)
        out -= 0.6 * a * band * body
    return out


# --- both -----------------------------------------------------------------------------------


# Physical thickness factors over the range of TorchIO's RandomAnisotropy (1.5-5). Not that
# transform itself: its nearest-neighbour downsampling makes the change with the factor
# non-monotone for a given volume (a factor of 4 can alter less than 3).
@register_corruption(
    "thick-slices",
    (1.5, 2.0, 3.0, 4.0, 5.0),
    calibration="slice-thickness factors over TorchIO RandomAnisotropy's default range 1.5-5",
)
def thick_slices(vol: np.ndarray, f: float, rng: np.random.Generator, spacing) -> np.ndarray:
    """Slices ``f`` times thicker: a Gaussian slice profile of FWHM ``f`` voxels along z,
    sampled every ``f`` voxels (at a random phase) and linearly interpolated back to the grid."""
    n = vol.shape[SLICE_AXIS]
    blurred = gaussian_filter1d(
        vol, f / (2 * np.sqrt(2 * np.log(2))), axis=SLICE_AXIS, mode="nearest"
    )
    pos = np.arange(rng.uniform(0.0, 1.0) * f, n - 1 + 1e-9, f)
    if len(pos) < 2:
        pos = np.array([0.0, n - 1.0])
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = pos - lo
    acquired = blurred[:, :, lo] * (1 - w) + blurred[:, :, hi] * w
    back = np.interp(np.arange(n), pos, np.arange(len(pos)))
    i0 = np.floor(back).astype(int)
    i1 = np.minimum(i0 + 1, len(pos) - 1)
    t = back - i0
    return acquired[:, :, i0] * (1 - t) + acquired[:, :, i1] * t
