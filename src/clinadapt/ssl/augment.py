"""Augmentations for self-supervised views of medical images, batched on tensors.

Every operation takes a float (N,C,H,W) batch in [0,1] and draws its own parameters per image
from that image's generator (:class:`~clinadapt.ssl.draws.ImageDraws`), so an image's views
depend only on its seed, step and place in the global batch (resumable runs, several processes).
The policy follows the modality: grey-scale images (X-ray, CT, MRI, OCT, ultrasound) get
brightness, contrast and gamma changes instead of colour jitter; histology gets stain jitter in
the haematoxylin-eosin-DAB space; photographs (dermoscopy, fundus) get colour jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from clinadapt.errors import ConfigError
from clinadapt.models.base import LUMA_WEIGHTS
from clinadapt.ssl.draws import ImageDraws

GREY_MODALITIES = ("xray", "x-ray", "ct", "mri", "mr", "oct", "ultrasound", "us", "mammography")
STAIN_MODALITIES = ("pathology", "histology", "histopathology", "microscopy", "cytology")
# Modalities whose left and right are anatomically distinct: no horizontal flip.
LATERAL_MODALITIES = ("xray", "x-ray", "ct", "mri", "mr", "mammography")

# Ruifrok & Johnston (2001), "Quantification of histochemical staining by color deconvolution":
# optical-density vectors of haematoxylin, eosin and DAB (rows), as used by skimage.color.rgb2hed.
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
# skimage scales optical densities by -log(1e-6); stain-jitter magnitudes are quoted in that unit.
_OD_SCALE = -math.log(1e-6)


@dataclass(frozen=True)
class AugmentPolicy:
    """Which intensity and geometric changes suit a modality (probabilities and ranges)."""

    kind: str  # grey | stain | colour
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: bool = False
    intensity_p: float = 0.8  # brightness/contrast/gamma (grey) or colour jitter (colour)
    brightness: float = 0.4
    contrast: float = 0.4
    gamma: tuple[float, float] = (0.7, 1.5)
    saturation: float = 0.4
    grayscale_p: float = 0.2
    # Tellez et al. (2019), "Quantifying the effects of data augmentation and stain colour
    # normalization in CNNs for computational pathology": HED-light jitter, sigma 0.05.
    stain_sigma: float = 0.05
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at 224x224 (SimCLR), scaled to size
    noise_p: float = 0.0
    noise_std: float = 0.03

    def geometric_only(self) -> AugmentPolicy:
        """The same flips without intensity, colour, blur or noise (MAE's augmentation)."""
        return replace(
            self, intensity_p=0.0, grayscale_p=0.0, stain_sigma=0.0, blur_p=0.0, noise_p=0.0
        )


def policy_for_modality(modality: str) -> AugmentPolicy:
    """The augmentation policy of a dataset's ``modality`` (unknown modalities: colour images)."""
    m = (modality or "unknown").lower()
    if m in STAIN_MODALITIES:
        # tissue has no canonical orientation: all flips and right-angle rotations
        return AugmentPolicy(
            "stain",
            hflip=0.5,
            vflip=0.5,
            rot90=True,
            intensity_p=0.5,
            brightness=0.2,
            contrast=0.2,
            grayscale_p=0.0,
        )
    if m in GREY_MODALITIES:
        return AugmentPolicy(
            "grey",
            hflip=0.0 if m in LATERAL_MODALITIES else 0.5,
            grayscale_p=0.0,
            noise_p=0.2,
        )
    return AugmentPolicy("colour")


# --- geometric ---------------------------------------------------------------------------------


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    gen: ImageDraws,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random box per image (area fraction in ``scale``) and resize it to ``size``."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    n, _, h, w = x.shape
    u = gen.rand(4, dtype=torch.float64)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * h * w
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).clamp(1.0, w)
    ch = torch.sqrt(area / aspect).clamp(1.0, h)
    x0 = (w - cw) * u[:, 2]
    y0 = (h - ch) * u[:, 3]
    idx = torch.arange(n, dtype=torch.float64)
    boxes = torch.stack([idx, x0, y0, x0 + cw, y0 + ch], dim=1).to(x.dtype)
    # sampling_ratio=2 averages 2x2 samples per output pixel: a little antialiasing when shrinking
    return roi_align(x, boxes, output_size=(size, size), sampling_ratio=2, aligned=True)


def _choose(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def random_flips(
    x: torch.Tensor, hflip: float, vflip: float, rot90: bool, gen: ImageDraws
) -> torch.Tensor:
    """Flip left-right / up-down with the given probabilities; optionally rotate by k*90 degrees."""
    u = gen.rand(3)
    if hflip > 0:
        x = _choose(u[:, 0] < hflip, x.flip(-1), x)
    if vflip > 0:
        x = _choose(u[:, 1] < vflip, x.flip(-2), x)
    if rot90 and x.shape[-1] == x.shape[-2]:
        k = (u[:, 2] * 4).long().clamp(max=3)
        out = x.clone()
        for r in (1, 2, 3):
            sel = k == r
            if sel.any():
                out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        x = out
    return x


# --- intensity ---------------------------------------------------------------------------------


def _uniform(lo: float, hi: float, gen: ImageDraws) -> torch.Tensor:
    return lo + (hi - lo) * gen.rand()


def grey_intensity(
    x: torch.Tensor,
    p: float,
    brightness: float,
    contrast: float,
    gamma: tuple[float, float],
    gen: ImageDraws,
) -> torch.Tensor:
    """Scale brightness, stretch contrast around the image mean and apply a gamma curve."""
    apply = gen.rand() < p
    b = _uniform(1 - brightness, 1 + brightness, gen)
    c = _uniform(1 - contrast, 1 + contrast, gen)
    g = torch.exp(_uniform(math.log(gamma[0]), math.log(gamma[1]), gen))
    b, c, g = (torch.where(apply, v, torch.ones_like(v)).view(-1, 1, 1, 1) for v in (b, c, g))
    y = (x * b).clamp(0, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * c + mean).clamp(0, 1)
    return y.pow(g)


def luma(x: torch.Tensor) -> torch.Tensor:
    """BT.601 grey level of an RGB batch, (N,1,H,W)."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def colour_jitter(
    x: torch.Tensor,
    p: float,
    brightness: float,
    contrast: float,
    saturation: float,
    gen: ImageDraws,
) -> torch.Tensor:
    """SimCLR-style brightness, contrast and saturation jitter of RGB images."""
    apply = gen.rand() < p
    b = _uniform(1 - brightness, 1 + brightness, gen)
    c = _uniform(1 - contrast, 1 + contrast, gen)
    s = _uniform(1 - saturation, 1 + saturation, gen)
    b, c, s = (torch.where(apply, v, torch.ones_like(v)).view(-1, 1, 1, 1) for v in (b, c, s))
    y = (x * b).clamp(0, 1)
    if y.shape[1] == 3:
        mean = luma(y).mean(dim=(2, 3), keepdim=True)
        y = ((y - mean) * c + mean).clamp(0, 1)
        grey = luma(y)
        y = ((y - grey) * s + grey).clamp(0, 1)
    else:
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * c + mean).clamp(0, 1)
    return y


def random_grayscale(x: torch.Tensor, p: float, gen: ImageDraws) -> torch.Tensor:
    """Replace RGB images by their grey level with probability ``p``."""
    if p <= 0 or x.shape[1] != 3:
        return x
    mask = gen.rand() < p
    return _choose(mask, luma(x).expand_as(x), x)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (haematoxylin, eosin, DAB) of an RGB batch (skimage's scaling).

    Unlike skimage, negative concentrations are kept, so :func:`hed_to_rgb` inverts it exactly.
    """
    m = RGB_FROM_HED.to(x.dtype)
    od = -torch.log(x.clamp_min(1e-6)) / _OD_SCALE
    return torch.einsum("nchw,cs->nshw", od, torch.linalg.inv(m))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Invert :func:`rgb_to_hed`."""
    m = RGB_FROM_HED.to(hed.dtype)
    od = torch.einsum("nshw,sc->nchw", hed, m) * _OD_SCALE
    return torch.exp(-od).clamp(0, 1)


def stain_jitter(x: torch.Tensor, sigma: float, gen: ImageDraws) -> torch.Tensor:
    """Perturb each stain: ``hed * alpha + beta``, alpha ~ U(1-s, 1+s), beta ~ U(-s, s)."""
    if sigma <= 0 or x.shape[1] != 3:
        return x
    n = x.shape[0]
    alpha = (1 - sigma + 2 * sigma * gen.rand(3)).view(n, 3, 1, 1)
    beta = (-sigma + 2 * sigma * gen.rand(3)).view(n, 3, 1, 1)
    hed = rgb_to_hed(x)
    return hed_to_rgb(hed * alpha.to(x.dtype) + beta.to(x.dtype))


def gaussian_blur(
    x: torch.Tensor, p: float, sigma: tuple[float, float], gen: ImageDraws
) -> torch.Tensor:
    """Blur each image with probability ``p`` by a Gaussian of random width (pixels)."""
    n, c, h, w = x.shape
    apply = gen.rand() < p
    s = _uniform(sigma[0], sigma[1], gen)
    if p <= 0 or not apply.any():
        return x
    radius = max(1, min(math.ceil(3 * float(s[apply].max())), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / s.view(-1, 1).to(x.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype).expand_as(k)
    k = torch.where(apply.view(-1, 1), k, delta)  # the identity kernel for images left sharp
    k = k.repeat_interleave(c, dim=0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def gaussian_noise(x: torch.Tensor, p: float, std: float, gen: ImageDraws) -> torch.Tensor:
    """Add Gaussian noise of standard deviation U(0, std) to each image with probability ``p``."""
    if p <= 0:
        return x
    apply = (gen.rand() < p).to(x.dtype)
    s = (_uniform(0.0, std, gen).to(x.dtype) * apply).view(-1, 1, 1, 1)
    return (x + s * gen.randn(*x.shape[1:], dtype=x.dtype)).clamp(0, 1)


# --- the pipeline ------------------------------------------------------------------------------


class Augmenter:
    """Turn a [0,1] batch into normalised random views, following a modality policy."""

    def __init__(
        self, policy: AugmentPolicy, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.policy = policy
        self.mean = mean
        self.std = std

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the model's mean/std (a grey model with RGB stats uses their average)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if mean.shape[1] != x.shape[1]:
            mean = mean.mean().expand(1, x.shape[1], 1, 1)
            std = std.mean().expand(1, x.shape[1], 1, 1)
        return (x - mean) / std

    def view(
        self,
        x: torch.Tensor,
        size: int,
        scale: tuple[float, float],
        gen: ImageDraws,
        policy: AugmentPolicy | None = None,
    ) -> torch.Tensor:
        """One random view per image: crop, flips, intensity/stain/colour, blur, noise."""
        if len(gen) != x.shape[0]:
            raise ValueError(f"{len(gen)} image generators for a batch of {x.shape[0]} images")
        pol = policy or self.policy
        y = random_resized_crop(x, size, scale, gen)
        y = random_flips(y, pol.hflip, pol.vflip, pol.rot90, gen)
        if pol.kind == "grey":
            y = grey_intensity(y, pol.intensity_p, pol.brightness, pol.contrast, pol.gamma, gen)
        elif pol.kind == "stain":
            y = stain_jitter(y, pol.stain_sigma, gen)
            y = colour_jitter(y, pol.intensity_p, pol.brightness, pol.contrast, 0.0, gen)
        else:
            y = colour_jitter(y, pol.intensity_p, pol.brightness, pol.contrast, pol.saturation, gen)
            y = random_grayscale(y, pol.grayscale_p, gen)
        scale_px = size / 224.0
        blur = (pol.blur_sigma[0] * scale_px, pol.blur_sigma[1] * scale_px)
        y = gaussian_blur(y, pol.blur_p, blur, gen)
        y = gaussian_noise(y, pol.noise_p, pol.noise_std, gen)
        return self.normalise(y)
