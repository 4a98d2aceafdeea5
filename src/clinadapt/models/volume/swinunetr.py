"""SwinUNETR (Hatamizadeh et al., 2022) from MONAI: its Swin transformer encoder for
classification and its U-shaped decoder for segmentation.

The encoder is MONAI's own ``SwinTransformer`` (the ``swinViT`` of ``SwinUNETR``), with its four
stages listed as ``stages`` so block-wise targets (last-k, LoRA on ``qkv``, adapters) find them;
the forward is MONAI's (patch embedding, then each stage, each output layer-normalised without
affine parameters). Pooled features: the global average of the deepest stage (16 x
feature_size channels). The decoder is a MONAI ``SwinUNETR``'s convolutional blocks (encoder1-4,
encoder10, decoder1-5, out) run on those features; a test checks it against MONAI's full
network with the same weights. Published weights: the self-supervised Swin encoder of Tang et
al. (CVPR 2022, ``model_swinvit.pt``: ``state_dict`` with ``module.*`` keys, read by MONAI's
``load_from``) and the disruptive-autoencoder weights (``ssl_pretrained_weights.pth``:
``model`` with ``encoder.*`` keys, MONAI's ``filter_swinunetr``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.models.volume.base import MappedCheckpoint, VolumeArch

_DECODER_PARTS = (
    "encoder1",
    "encoder2",
    "encoder3",
    "encoder4",
    "encoder10",
    "decoder5",
    "decoder4",
    "decoder3",
    "decoder2",
    "decoder1",
    "out",
)


@dataclass(frozen=True)
class SwinConfig:
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    in_chans: int = 1
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.feature_size % 12:
            raise IncompatibleError(
                f"swinunetr: feature_size must be a multiple of 12, got {self.feature_size}"
            )


def _swin_unetr(cfg: SwinConfig, out_channels: int) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=cfg.in_chans,
        out_channels=out_channels,
        feature_size=cfg.feature_size,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
        dropout_path_rate=cfg.drop_path_rate,
        spatial_dims=3,
    )


class SwinEncoder(nn.Module):
    """MONAI's Swin transformer with its stages as one list; returns the five normalised maps."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        swin = _swin_unetr(cfg, 1).swinViT
        self.patch_embed = swin.patch_embed
        self.pos_drop = swin.pos_drop
        self.stages = nn.ModuleList(
            [swin.layers1[0], swin.layers2[0], swin.layers3[0], swin.layers4[0]]
        )

    @staticmethod
    def proj_out(x: torch.Tensor) -> torch.Tensor:
        """Layer norm over the channels without affine parameters (MONAI's ``normalize``)."""
        return F.layer_norm(x.movedim(1, -1), [x.shape[1]]).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.pos_drop(self.patch_embed(x))
        out = [self.proj_out(y)]
        for stage in self.stages:
            y = stage(y.contiguous())
            out.append(self.proj_out(y))
        return out


class SwinDecoder(nn.Module):
    """SwinUNETR's convolutional encoder/decoder blocks on the Swin features and the input."""

    def __init__(self, cfg: SwinConfig, out_channels: int) -> None:
        super().__init__()
        full = _swin_unetr(cfg, out_channels)
        for part in _DECODER_PARTS:
            self.add_module(part, getattr(full, part))

    def forward(self, feats: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            raise IncompatibleError("the SwinUNETR decoder also reads the input volume")
        hs = feats
        if hs[4].shape[2:].numel() == 1:
            raise IncompatibleError(
                f"SwinUNETR segments patches of at least 64^3 voxels (its decoder normalises the "
                f"deepest map per volume, which is 1 voxel at {tuple(x.shape[2:])}); set "
                "model_options.volume_size to 64 or more"
            )
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hs[0])
        enc2 = self.encoder3(hs[1])
        enc3 = self.encoder4(hs[2])
        dec4 = self.encoder10(hs[4])
        dec3 = self.decoder5(dec4, hs[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, enc0))


class SwinUNETRArch(VolumeArch):
    divisor = 32  # 2^5: patch embedding and four merges

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__(SwinEncoder(cfg), 16 * cfg.feature_size)
        self.cfg = cfg

    def make_decoder(self, out_channels: int) -> nn.Module:
        return SwinDecoder(self.cfg, out_channels)

    def map_checkpoint(self, state: Mapping[str, torch.Tensor]) -> MappedCheckpoint:
        """MONAI's ``swinViT.*`` (a full SwinUNETR), Tang et al.'s ``module.*`` and the
        disruptive autoencoders' ``encoder.*`` layouts; ``layersK.0`` becomes ``stages.K-1``."""
        keys = list(state)
        if any(k.startswith("swinViT.") for k in keys):
            prefix = "swinViT."
        elif any(k.startswith("module.") for k in keys):
            prefix = "module."
        elif any(k.startswith("encoder.") for k in keys):
            return self._from_filter(state)
        else:
            prefix = ""
        out = MappedCheckpoint({}, {}, [])
        for k, v in state.items():
            if prefix and not k.startswith(prefix):
                head = k.split(".", 1)[0]
                if head in _DECODER_PARTS:
                    out.decoder[k] = v
                else:
                    out.ignored.append(k)
                continue
            rest = k[len(prefix) :]
            if prefix == "module.":  # Tang et al. name the MLP layers as timm does
                rest = rest.replace(".mlp.fc1.", ".mlp.linear1.").replace(
                    ".mlp.fc2.", ".mlp.linear2."
                )
            mapped = _stage_key(rest)
            if mapped is None:
                out.ignored.append(k)
            else:
                out.encoder[mapped] = v
        return out

    def _from_filter(self, state: Mapping[str, torch.Tensor]) -> MappedCheckpoint:
        from monai.networks.nets.swin_unetr import filter_swinunetr

        out = MappedCheckpoint({}, {}, [])
        for k, v in state.items():
            hit = filter_swinunetr(k, v)
            mapped = _stage_key(hit[0][len("swinViT.") :]) if hit else None
            if mapped is None:
                out.ignored.append(k)
            else:
                out.encoder[mapped] = v
        return out

    def config(self) -> dict[str, Any]:
        return {"arch": "swinunetr", **self.cfg.__dict__}


def _stage_key(key: str) -> str | None:
    """``layers2.0.blocks.1...`` -> ``stages.1.blocks.1...``; patch embedding kept; else None."""
    if key.startswith(("patch_embed.", "pos_drop.")):
        return key
    for k in range(1, 5):
        p = f"layers{k}.0."
        if key.startswith(p):
            return f"stages.{k - 1}." + key[len(p) :]
    return None
