"""STU-Net (Huang et al., 2023, "STU-Net: Scalable and Transferable Medical Image Segmentation
Models Empowered by Large-Scale Supervised Pre-training"), written against the paper and the
authors' configuration values (github.com/uni-medical/STU-Net, ``STUNetTrainer``).

Encoder: six stages of residual blocks (conv 3^3 - InstanceNorm - LeakyReLU - conv - norm, plus
a 1x1 projection in a stage's first block, then LeakyReLU); stages 2-6 start with stride 2 (the
pooling of the nnU-Net plans, five times 2x2x2). Decoder: nearest-neighbour upsampling and a 1x1
convolution, concatenation with the skip, residual blocks at that level's width, and a 1x1
segmentation output. Published sizes (``STUNetTrainer_small/base/large/huge``):

==========  ==============================  ================
size        widths per stage                blocks per stage
==========  ==============================  ================
S (14M)     16, 32, 64, 128, 256, 256       1 each
B (58M)     32, 64, 128, 256, 512, 512      1 each
L (440M)    64, 128, 256, 512, 1024, 1024   2 each
==========  ==============================  ================

Pre-trained on TotalSegmentator at a 128^3 patch; checkpoints in the authors' nnU-Net v1 layout
(``state_dict`` of ``*_ep4k.model``: ``conv_blocks_context``, ``upsample_layers``,
``conv_blocks_localization``, ``seg_outputs``) load directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.models.volume.base import MappedCheckpoint, VolumeArch, he_init, norm_layer


@dataclass(frozen=True)
class STUNetConfig:
    dims: tuple[int, ...] = (32, 64, 128, 256, 512, 512)
    depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1)
    pool: int = 2  # every stage after the first halves each axis
    kernel: int = 3
    norm: str = "instance"
    in_chans: int = 1

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.depth):
            raise IncompatibleError(
                f"stunet: dims and depth need one entry per stage, got {self.dims}, {self.depth}"
            )


class BasicResBlock(nn.Module):
    """conv1-norm1-act1, conv2-norm2, + (1x1 conv3 of the input, strided), act2."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, norm: str, project: bool
    ) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad)
        self.norm1 = norm_layer(norm, cout)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv3d(cout, cout, kernel, padding=pad)
        self.norm2 = norm_layer(norm, cout)
        self.act2 = nn.LeakyReLU(0.01, inplace=True)
        self.conv3 = nn.Conv3d(cin, cout, 1, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


def _stage(cin: int, cout: int, n: int, kernel: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        BasicResBlock(cin, cout, kernel, stride, norm, project=True),
        *[BasicResBlock(cout, cout, kernel, 1, norm, project=False) for _ in range(n - 1)],
    )


class STUEncoder(nn.Module):
    def __init__(self, cfg: STUNetConfig) -> None:
        super().__init__()
        d = cfg.dims
        self.stages = nn.ModuleList(
            _stage(
                cfg.in_chans if s == 0 else d[s - 1],
                d[s],
                cfg.depth[s],
                cfg.kernel,
                1 if s == 0 else cfg.pool,
                cfg.norm,
            )
            for s in range(len(d))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class UpsampleNearest(nn.Module):
    """Nearest-neighbour upsampling then a 1x1 convolution (the authors' upsample layer)."""

    def __init__(self, cin: int, cout: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class STUDecoder(nn.Module):
    def __init__(self, cfg: STUNetConfig, out_channels: int) -> None:
        super().__init__()
        d, n = cfg.dims, len(cfg.dims)
        self.upsample_layers = nn.ModuleList(
            UpsampleNearest(d[-1 - u], d[-2 - u], cfg.pool) for u in range(n - 1)
        )
        self.stages = nn.ModuleList(
            _stage(2 * d[-2 - u], d[-2 - u], cfg.depth[-2 - u], cfg.kernel, 1, cfg.norm)
            for u in range(n - 1)
        )
        self.head = nn.Conv3d(d[0], out_channels, 1)
        he_init(self)

    def forward(self, feats: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        y = feats[-1]
        for u, (up, stage) in enumerate(zip(self.upsample_layers, self.stages, strict=True)):
            y = stage(torch.cat((up(y), feats[-(u + 2)]), 1))
        return self.head(y)


class STUNet(VolumeArch):
    def __init__(self, cfg: STUNetConfig) -> None:
        encoder = STUEncoder(cfg)
        he_init(encoder)
        super().__init__(encoder, cfg.dims[-1])
        self.cfg = cfg
        self.divisor = cfg.pool ** (len(cfg.dims) - 1)

    def make_decoder(self, out_channels: int) -> nn.Module:
        return STUDecoder(self.cfg, out_channels)

    def map_checkpoint(self, state: Mapping[str, torch.Tensor]) -> MappedCheckpoint:
        """The authors' names: ``conv_blocks_context`` (encoder), ``upsample_layers``,
        ``conv_blocks_localization`` and ``seg_outputs`` (the last is full resolution)."""
        last = len(self.cfg.dims) - 2
        out = MappedCheckpoint({}, {}, [])
        for k, v in state.items():
            head, _, rest = k.partition(".")
            if head == "conv_blocks_context":
                out.encoder["stages." + rest] = v
            elif head == "upsample_layers":
                out.decoder["upsample_layers." + rest] = v
            elif head == "conv_blocks_localization":
                out.decoder["stages." + rest] = v
            elif head == "seg_outputs" and rest.startswith(f"{last}."):
                out.decoder["head." + rest.split(".", 1)[1]] = v
            else:
                out.ignored.append(k)
        return out

    def config(self) -> dict[str, Any]:
        return {"arch": "stunet", **self.cfg.__dict__}
