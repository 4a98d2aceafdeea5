"""The common face of 3D backbones: an encoder with multi-scale features, pooled features for
classification, and a decoder built on demand for segmentation.

Every architecture (``resenc``, ``stunet``, ``primus``, ``swinunetr``) is a :class:`VolumeArch`:
its ``encoder`` maps a (N,C,X,Y,Z) batch to a list of feature maps (the deepest last), ``pool``
turns them into (N, feature_dim) features, and ``make_decoder(out_channels)`` builds the
segmentation decoder that reads them (with the input, for architectures whose decoder has a
full-resolution branch). ``map_checkpoint`` turns the authors' state-dict layout into this one.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.models.base import FoundationModel
from clinadapt.models.volume.preprocess import VolumePreprocessing


@dataclass
class MappedCheckpoint:
    """A published checkpoint in this package's layout: encoder and decoder tensors, and the keys
    that had no place (deep-supervision outputs, aliases, optimiser-free extras)."""

    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


class VolumeArch(abc.ABC):
    """One 3D architecture: its encoder, pooling, decoder and checkpoint layout."""

    #: the input side must be a multiple of this (the encoder's total stride)
    divisor: int = 1

    def __init__(self, encoder: nn.Module, feature_dim: int) -> None:
        self.encoder = encoder
        self.feature_dim = int(feature_dim)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps of a batch, the deepest last."""
        return list(self.encoder(x))

    def pool(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, feature_dim): global average of the deepest feature map."""
        return feats[-1].mean(dim=tuple(range(2, feats[-1].ndim)))

    @abc.abstractmethod
    def make_decoder(self, out_channels: int) -> nn.Module:
        """A decoder whose ``forward(feats, x)`` gives (N, out_channels, X,Y,Z) logits."""

    @abc.abstractmethod
    def map_checkpoint(self, state: Mapping[str, torch.Tensor]) -> MappedCheckpoint:
        """Split a checkpoint in the authors' layout into encoder and decoder tensors."""

    def config(self) -> dict[str, Any]:
        """The architecture's settings, for records and exports."""
        return {}


class VolumeModel(FoundationModel):
    """A 3D backbone behind the common interface: ``encode_image`` of a (N,C,X,Y,Z) batch.

    ``image_encoder`` is the architecture's encoder (what targets open); ``make_decoder``
    builds a segmentation decoder, loading the decoder tensors of the checkpoint the model came
    from where their names and shapes fit.
    """

    spatial_dims = 3

    def __init__(
        self,
        name: str,
        arch: VolumeArch,
        preprocess: VolumePreprocessing,
        *,
        source: str = "random init",
    ) -> None:
        super().__init__(name, "volume", arch.encoder, arch.feature_dim, preprocess, source=source)  # type: ignore[arg-type]
        self._arch = arch
        self.pretrained_decoder: dict[str, torch.Tensor] = {}
        self.checkpoint: dict[str, int] = {}  # what a loaded checkpoint held

    @property
    def arch(self) -> VolumeArch:
        return self._arch

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self._arch.features(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Map a preprocessed (N,C,X,Y,Z) batch to (N, feature_dim) pooled features."""
        if images.ndim != 5:
            raise IncompatibleError(
                f"model {self.name!r} is a 3D backbone and takes (N,C,X,Y,Z) volumes, got a "
                f"batch of shape {tuple(images.shape)}"
            )
        return self._arch.pool(self._arch.features(images))

    def make_decoder(self, out_channels: int) -> tuple[nn.Module, dict[str, Any]]:
        """A new segmentation decoder, and what it took from the checkpoint's decoder."""
        dec = self._arch.make_decoder(out_channels)
        info: dict[str, Any] = {"decoder": "random init"}
        if self.pretrained_decoder:
            own = dec.state_dict()
            fits = {
                k: v
                for k, v in self.pretrained_decoder.items()
                if k in own and tuple(own[k].shape) == tuple(v.shape)
            }
            dec.load_state_dict(fits, strict=False)
            info = {
                "decoder": "from the checkpoint where names and shapes fit",
                "decoder_tensors_loaded": len(fits),
                "decoder_tensors": len(own),
            }
        param = next(self.image_encoder.parameters())
        return dec.to(param.device), info

    def describe(self) -> dict:
        out = super().describe()
        out["spatial_dims"] = 3
        out["arch"] = self._arch.config()
        if self.checkpoint:
            out["checkpoint"] = dict(self.checkpoint)
        return out


def check_spatial_dims(model: nn.Module, dims: int, data: str) -> None:
    """Refuse a model whose input dimensionality is not the data's, saying what would fit."""
    have = int(getattr(model, "spatial_dims", 2))
    if have == dims:
        return
    name = getattr(model, "name", type(model).__name__)
    if dims == 3:
        raise IncompatibleError(
            f"model {name!r} is a 2D backbone, but {data!r} holds volumes; use a 3D backbone "
            "(tiny-resenc, resenc-l, stunet-b, primus-m, swinunetr, ...; clinadapt models lists "
            f"them under the volume family) or apply it slice by slice as 'slices:{name}'"
        )
    raise IncompatibleError(
        f"model {name!r} is a 3D backbone, but {data!r} holds 2D images; use a 2D model"
    )


# --- building blocks shared by the CNNs ------------------------------------------------------


def norm_layer(kind: str, channels: int) -> nn.Module:
    """InstanceNorm3d (affine, eps 1e-5: nnU-Net and STU-Net) or BatchNorm3d."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels, eps=1e-5)
    raise IncompatibleError(f"norm must be 'instance' or 'batch', got {kind!r}")


class ConvNormAct(nn.Module):
    """Conv3d -> norm -> LeakyReLU(0.01) (``act=False``: no activation), nnU-Net's conv unit."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        norm: str,
        act: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)
        self.norm = norm_layer(norm, cout)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


def he_init(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """Kaiming-normal convolution weights and zero biases (nnU-Net's ``InitWeights_He(1e-2)``)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def strip_prefix(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Drop one leading wrapper prefix (``module.``, ``network.``) that a trainer added."""
    out = dict(state)
    for p in prefixes:
        if out and all(k.startswith(p) for k in out):
            out = {k[len(p) :]: v for k, v in out.items()}
    return out


__all__ = [
    "ConvNormAct",
    "MappedCheckpoint",
    "VolumeArch",
    "VolumeModel",
    "check_spatial_dims",
    "he_init",
    "norm_layer",
    "strip_prefix",
]
