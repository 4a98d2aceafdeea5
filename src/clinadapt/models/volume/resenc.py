"""The nnU-Net residual-encoder U-Net (ResEnc; Isensee et al., MICCAI 2024, "nnU-Net Revisited").

Written here against the paper and the authors' configuration (dynamic-network-architectures'
``ResidualEncoderUNet``): its releases that support Primus pin timm<1.0.23, which clinadapt's
timm cannot meet, so the library is not a dependency; a test checks this implementation against
outputs the library computed. Encoder: a stem (conv 3^3, InstanceNorm, LeakyReLU 0.01), then
stages of residual blocks (``BasicBlockD``: conv-norm-act, conv-norm, plus a skip that average
pools when strided and projects by a 1x1 conv + norm when the width changes, then the
activation); the first block of a stage carries its stride. Decoder: per level a transposed
convolution, concatenation with the skip, ``n_conv_decoder`` conv-norm-act units and a 1x1
segmentation layer (only the full-resolution one is kept: no deep supervision).

The published ResEnc-L (the OpenMind benchmark's CNN; nnU-Net's L preset) has 6 stages of
32, 64, 128, 256, 320, 320 features with 1, 3, 4, 6, 6, 6 blocks, strides 1, 2, 2, 2, 2, 2 and
one decoder convolution per level, at a 160^3 patch. Checkpoints in nnU-Net's layout
(``network_weights`` of a ``checkpoint_final.pth``) load directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.models.volume.base import ConvNormAct, MappedCheckpoint, VolumeArch, he_init


@dataclass(frozen=True)
class ResEncConfig:
    """Architecture settings (the ``kwargs`` of a resenc model spec)."""

    features: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    blocks: tuple[int, ...] = (1, 3, 4, 6, 6, 6)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    n_conv_decoder: int = 1
    kernel: int = 3
    norm: str = "instance"  # the published models; "batch" for BatchNorm test-time methods
    in_chans: int = 1

    def __post_init__(self) -> None:
        if not len(self.features) == len(self.blocks) == len(self.strides):
            raise IncompatibleError(
                "resenc: features, blocks and strides need one entry per stage, got "
                f"{len(self.features)}, {len(self.blocks)} and {len(self.strides)}"
            )


class BasicBlockD(nn.Module):
    """Residual block: conv-norm-act, conv-norm, + skip (avg-pool, 1x1 conv-norm), act."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, kernel, stride, norm)
        self.conv2 = ConvNormAct(cout, cout, kernel, 1, norm, act=False)
        self.nonlin2 = nn.LeakyReLU(0.01, inplace=True)
        skip: list[nn.Module] = []
        if stride != 1:
            skip.append(nn.AvgPool3d(stride, stride))
        if cin != cout:
            skip.append(ConvNormAct(cin, cout, 1, 1, norm, act=False, bias=False))
        self.skip = nn.Sequential(*skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin2(self.conv2(self.conv1(x)) + self.skip(x))


class ResidualStage(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, kernel: int, stride: int, norm: str) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            BasicBlockD(cin, cout, kernel, stride, norm),
            *[BasicBlockD(cout, cout, kernel, 1, norm) for _ in range(n - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ConvStack(nn.Module):
    """``n`` conv-norm-act units (``convs.<i>``), the first carrying the stride."""

    def __init__(self, cin: int, cout: int, n: int, kernel: int, stride: int, norm: str) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(cin, cout, kernel, stride, norm),
            *[ConvNormAct(cout, cout, kernel, 1, norm) for _ in range(n - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class ResidualEncoder(nn.Module):
    """Stem + residual stages; ``forward`` returns every stage's output (the skips)."""

    def __init__(self, cfg: ResEncConfig) -> None:
        super().__init__()
        f = cfg.features
        self.stem = ConvStack(cfg.in_chans, f[0], 1, cfg.kernel, 1, cfg.norm)
        self.stages = nn.ModuleList(
            ResidualStage(
                f[max(s - 1, 0)], f[s], cfg.blocks[s], cfg.kernel, cfg.strides[s], cfg.norm
            )
            for s in range(len(f))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class ResEncDecoder(nn.Module):
    """Transposed conv up, concatenate the skip, conv stack; a 1x1 head at full resolution."""

    def __init__(self, cfg: ResEncConfig, out_channels: int) -> None:
        super().__init__()
        f, s = cfg.features, cfg.strides
        n = len(f)
        self.transpconvs = nn.ModuleList(
            nn.ConvTranspose3d(f[n - 1 - i], f[n - 2 - i], s[n - 1 - i], stride=s[n - 1 - i])
            for i in range(n - 1)
        )
        self.stages = nn.ModuleList(
            ConvStack(2 * f[n - 2 - i], f[n - 2 - i], cfg.n_conv_decoder, cfg.kernel, 1, cfg.norm)
            for i in range(n - 1)
        )
        self.head = nn.Conv3d(f[0], out_channels, 1)
        he_init(self)

    def forward(self, feats: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        y = feats[-1]
        for i, (up, stage) in enumerate(zip(self.transpconvs, self.stages, strict=True)):
            y = stage(torch.cat((up(y), feats[-(i + 2)]), 1))
        return self.head(y)


class ResEnc(VolumeArch):
    def __init__(self, cfg: ResEncConfig) -> None:
        encoder = ResidualEncoder(cfg)
        he_init(encoder)
        for m in encoder.modules():  # each block starts as the identity (the authors' init)
            if isinstance(m, BasicBlockD):
                nn.init.zeros_(m.conv2.norm.weight)
                nn.init.zeros_(m.conv2.norm.bias)
        super().__init__(encoder, cfg.features[-1])
        self.cfg = cfg
        div = 1
        for s in cfg.strides:
            div *= s
        self.divisor = div

    def make_decoder(self, out_channels: int) -> nn.Module:
        return ResEncDecoder(self.cfg, out_channels)

    def map_checkpoint(self, state: Mapping[str, torch.Tensor]) -> MappedCheckpoint:
        """nnU-Net's layout: ``encoder.*`` and ``decoder.*`` with ``all_modules`` aliases and a
        copy of the encoder under ``decoder.encoder``; ``decoder.seg_layers.<last>`` is the head."""
        n_dec = len(self.cfg.features) - 1
        out = MappedCheckpoint({}, {}, [])
        for k, v in state.items():
            if ".all_modules." in k or k.startswith("decoder.encoder."):
                out.ignored.append(k)
            elif k.startswith("encoder."):
                out.encoder[k[len("encoder.") :]] = v
            elif k.startswith(f"decoder.seg_layers.{n_dec - 1}."):
                out.decoder["head." + k.rsplit(".", 1)[1]] = v
            elif k.startswith("decoder.seg_layers."):
                out.ignored.append(k)  # deep-supervision outputs
            elif k.startswith("decoder."):
                out.decoder[k[len("decoder.") :]] = v
            else:
                out.ignored.append(k)
        return out

    def config(self) -> dict[str, Any]:
        return {"arch": "resenc", **{k: v for k, v in self.cfg.__dict__.items()}}
