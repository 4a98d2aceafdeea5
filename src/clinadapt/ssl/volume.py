"""Self-supervised pre-training of 3D backbones on unlabelled volumes: masked-volume
autoencoding (``mae-3d``) and SimCLR on two 3D views (``simclr-3d``).

``mae-3d`` follows the MAE recipe of the OpenMind 3D SSL benchmark (Wald et al., 2024, "An
OpenMind for 3D medical vision self-supervised learning", which pre-trains ResEnc-L and Primus
with it): the volume is cut into cubes of ``mask_patch`` voxels (16^3 there), ``mask_ratio`` of
them (75%) are set to zero in the input, the whole encoder-decoder network reconstructs the
volume, and the loss is the mean squared error on the masked voxels only. Every 3D backbone of
the registry has a decoder (:meth:`VolumeModel.make_decoder`), so the same objective fits the
CNNs and the transformers; only the encoder is exported.

``simclr-3d`` is SimCLR (Chen et al., ICML 2020) with 3D views: a random box of 35-100% of the
volume resized back to the model's grid, flips along each axis, brightness/contrast/gamma on
the [0, 1] window and Gaussian noise (the intensity and spatial augmentations of the 3D
contrastive baselines, e.g. Tang et al. CVPR 2022), then NT-Xent on the projected features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from clinadapt.errors import IncompatibleError
from clinadapt.models.base import FoundationModel
from clinadapt.ssl.augment import Augmenter
from clinadapt.ssl.base import SSL_METHODS, Options, SSLMethod
from clinadapt.ssl.collective import share
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.simclr import ProjectionMLP, nt_xent


def require_volume_model(model: FoundationModel, method: str) -> None:
    """Refuse a 2D backbone for a 3D objective, naming the 2D method to use instead."""
    if getattr(model, "spatial_dims", 2) != 3:
        raise IncompatibleError(
            f"pre-training method {method!r} trains 3D backbones; {model.name!r} is a 2D model "
            f"(use {method.removesuffix('-3d')!r} for 2D images)"
        )


def uniform(lo: float, hi: float, gen: ImageDraws) -> torch.Tensor:
    """One draw from U(lo, hi) per volume."""
    return lo + (hi - lo) * gen.rand()


def random_box_crop(
    x: torch.Tensor, size: tuple[int, int, int], scale: tuple[float, float], gen: ImageDraws
) -> torch.Tensor:
    """Per volume, a random box holding ``scale`` of its voxels (sides in proportion), resized
    trilinearly to ``size``: the 3D random-resized crop."""
    out = []
    shape = x.shape[2:]
    u = gen.rand(4, dtype=torch.float64)
    for i in range(x.shape[0]):
        frac = float(scale[0] + (scale[1] - scale[0]) * u[i, 0]) ** (1 / 3)
        box = [max(1, min(s, round(s * frac))) for s in shape]
        start = [
            min(s - b, int(float(u[i, 1 + a]) * (s - b + 1)))
            for a, (s, b) in enumerate(zip(shape, box, strict=True))
        ]
        crop = x[i : i + 1, :, *(slice(a, a + b) for a, b in zip(start, box, strict=True))]
        out.append(F.interpolate(crop, size=size, mode="trilinear", align_corners=False))
    return torch.cat(out)


def random_axis_flips(x: torch.Tensor, gen: ImageDraws, p: float = 0.5) -> torch.Tensor:
    """Flip each volume along each spatial axis with probability ``p`` (independently)."""
    flips = gen.rand(3) < p
    out = x.clone()
    for i in range(x.shape[0]):
        dims = [2 + a for a in range(3) if flips[i, a]]
        if dims:
            out[i] = torch.flip(x[i : i + 1], dims)[0]
    return out


def intensity_jitter(
    x: torch.Tensor,
    gen: ImageDraws,
    brightness: float = 0.1,
    contrast: float = 0.25,
    gamma: tuple[float, float] = (0.7, 1.5),
    noise_std: float = 0.03,
) -> torch.Tensor:
    """Brightness, contrast about the volume mean, gamma and Gaussian noise on a [0, 1] batch."""
    view = (x.shape[0], 1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    c = uniform(1 - contrast, 1 + contrast, gen).view(view)
    b = uniform(-brightness, brightness, gen).view(view)
    y = ((x - mean) * c + mean + b).clamp(0, 1)
    g = torch.exp(uniform(math.log(gamma[0]), math.log(gamma[1]), gen)).view(view)
    y = y.pow(g)
    y = y + noise_std * gen.randn(*y.shape[1:])
    return y.clamp(0, 1)


def cube_mask(
    size: tuple[int, int, int], patch: int, ratio: float, gen: ImageDraws
) -> torch.Tensor:
    """(N,1,X,Y,Z) bool, one volume per generator of ``gen``: True where a voxel is masked;
    ``ratio`` of the ``patch``^3 cubes of each volume, drawn without replacement (at least one
    cube masked, at least one visible)."""
    n = len(gen)
    grid = [max(1, -(-s // patch)) for s in size]
    cubes = grid[0] * grid[1] * grid[2]
    k = min(cubes - 1, max(1, round(ratio * cubes))) if cubes > 1 else 1
    order = torch.argsort(gen.rand(cubes), dim=1)
    flat = torch.zeros(n, cubes, dtype=torch.bool)
    flat.scatter_(1, order[:, :k], True)
    m = flat.view(n, 1, *grid).float()
    for axis in range(3):
        m = m.repeat_interleave(patch, dim=2 + axis)
    return m[:, :, : size[0], : size[1], : size[2]].bool()


class MAE3DOptions(Options):
    mask_ratio: float = Field(
        0.75, gt=0.0, lt=1.0, description="share of cubes masked (OpenMind: 0.75)"
    )
    mask_patch: int = Field(16, ge=1, description="side of a masked cube in voxels (OpenMind: 16)")
    crop_scale: tuple[float, float] = Field(
        (1.0, 1.0), description="share of the volume each view crops (1, 1: the whole volume)"
    )


@SSL_METHODS.register(
    "mae-3d", help="3D masked autoencoding of volume backbones (OpenMind's MAE: 16^3 cubes, 75%)"
)
class MAE3D(SSLMethod):
    """Zero ``mask_ratio`` of the cubes; the encoder-decoder reconstructs the masked voxels."""

    name = "mae-3d"
    spatial_dims = 3
    Options = MAE3DOptions
    base_lr = 1.5e-4  # MAE's 1.5e-4 * batch/256 (AdamW, betas 0.9/0.95)
    weight_decay = 0.05
    betas = (0.9, 0.95)
    options: MAE3DOptions

    def __init__(
        self, backbone: FoundationModel, options: MAE3DOptions, augment: Augmenter
    ) -> None:
        super().__init__(backbone, options, augment)
        require_volume_model(backbone, self.name)
        self.size = tuple(backbone.preprocess.volume_size)
        self.decoder, _ = backbone.make_decoder(backbone.preprocess.in_chans)

    def training_loss(
        self, images: torch.Tensor, gen: ImageDraws, step: int, total: int
    ) -> torch.Tensor:
        o = self.options
        x = (
            random_box_crop(images, self.size, o.crop_scale, gen)
            if o.crop_scale != (1.0, 1.0)
            else images
        )
        target = self.backbone.preprocess.model_input(x)  # the normalised volume
        mask = cube_mask(self.size, o.mask_patch, o.mask_ratio, gen)
        mask = mask.expand_as(target)
        inp = target.masked_fill(mask, 0.0)
        inp, target, mask = inp.to(self.device), target.to(self.device), mask.to(self.device)
        pred = self.decoder(self.backbone.features(inp), inp)
        loss = F.mse_loss(pred[mask], target[mask])
        return share(loss, mask.sum())  # this process's part of the global batch's mean


class SimCLR3DOptions(Options):
    temperature: float = Field(0.1, gt=0.0, description="NT-Xent temperature")
    proj_dim: int = Field(128, ge=1, description="output size of the projection MLP")
    proj_hidden: int | None = Field(None, ge=1, description="hidden size (None: feature size)")
    crop_scale: tuple[float, float] = Field(
        (0.35, 1.0), description="share of the volume each view's box holds"
    )


@SSL_METHODS.register("simclr-3d", help="SimCLR on two 3D views (box crops, flips, intensity)")
class SimCLR3D(SSLMethod):
    """Two 3D views per volume; their projections attract, all other views in the batch repel."""

    name = "simclr-3d"
    spatial_dims = 3
    Options = SimCLR3DOptions
    base_lr = 1e-3  # as the 2D SimCLR here (AdamW instead of LARS)
    weight_decay = 1e-6
    options: SimCLR3DOptions

    def __init__(
        self, backbone: FoundationModel, options: SimCLR3DOptions, augment: Augmenter
    ) -> None:
        super().__init__(backbone, options, augment)
        require_volume_model(backbone, self.name)
        d = backbone.feature_dim
        self.projector = ProjectionMLP(d, options.proj_hidden or d, options.proj_dim)
        self.size = tuple(backbone.preprocess.volume_size)

    def views(self, images: torch.Tensor, gen: ImageDraws) -> list[torch.Tensor]:
        """Two independently augmented, normalised views of every volume."""
        scale = tuple(self.options.crop_scale)
        out = []
        for _ in range(2):
            v = random_box_crop(images, self.size, scale, gen)
            v = intensity_jitter(random_axis_flips(v, gen), gen)
            out.append(self.backbone.preprocess.model_input(v))
        return out

    def training_loss(
        self, images: torch.Tensor, gen: ImageDraws, step: int, total: int
    ) -> torch.Tensor:
        v1, v2 = self.views(images, gen)
        z = self.projector(self.backbone.encode_image(torch.cat([v1, v2]).to(self.device)))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.options.temperature)


def load_volumes(volumes: list, size: tuple[int, int, int]) -> torch.Tensor:
    """A float [0, 1] (N,1,X,Y,Z) batch at ``size`` (trilinear), before normalisation."""
    out = []
    for v in volumes:
        t = torch.as_tensor(v, dtype=torch.float32)
        if tuple(t.shape) != tuple(size):
            t = F.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
        out.append(t[None])
    return torch.stack(out)
