"""A 2D backbone on volumes: encode axial slices one by one, pool across slices.

This is how 2D foundation models are commonly applied to CT and MRI (e.g. slice-wise DINOv2 or
CLIP features averaged over a volume). ``slices:<model>`` wraps any 2D model of the registry:
``slices`` axial slices spread evenly over the volume (all when it has fewer), each rotated as
the 2D NIfTI reader shows it (anterior at the top) and passed through the 2D model's own
preprocessing; the (N, S, D) slice features are pooled to (N, D) by their mean (default) or
maximum. Targets open the 2D backbone's parameters, shared by every slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from clinadapt.errors import ConfigError
from clinadapt.models.base import FoundationModel, Preprocessing
from clinadapt.models.volume.preprocess import _as_volumes

PREFIX = "slices:"
Pooling = Literal["mean", "max"]
OPTIONS = ("slices", "slice_pooling")


def slice_positions(depth: int, count: int) -> np.ndarray:
    """``count`` slice indices spread evenly over ``depth`` (centres of equal bins)."""
    if depth >= count:
        return np.floor((np.arange(count) + 0.5) * depth / count).astype(np.int64)
    return np.floor(np.arange(count) * depth / count).astype(np.int64)  # repeats slices


@dataclass(frozen=True)
class SlicePreprocessing:
    """Volumes -> (N, S, C, H, W): S axial slices, each through the 2D preprocessing."""

    image: Preprocessing
    slices: int = 16

    @property
    def in_chans(self) -> int:
        return self.image.in_chans

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "slices", "slices": self.slices, "image": self.image.to_dict()}

    def __call__(self, volumes: Sequence[np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
        vols = _as_volumes(volumes)
        out = []
        for v in vols:
            ks = slice_positions(v.shape[2], self.slices)
            planes = [torch.rot90(v[:, :, int(k)], 1, (0, 1)).contiguous().numpy() for k in ks]
            out.append(self.image(planes))
        return torch.stack(out)


class SliceWiseModel(FoundationModel):
    """A 2D backbone applied to every selected slice of a volume, slice features pooled."""

    spatial_dims = 3

    def __init__(self, inner: FoundationModel, slices: int, pooling: Pooling) -> None:
        super().__init__(
            f"{PREFIX}{inner.name}",
            inner.family,
            inner.image_encoder,
            inner.feature_dim,
            SlicePreprocessing(inner.preprocess, slices),  # type: ignore[arg-type]
            source=inner.source,
        )
        # the 2D model itself, not registered as a submodule: its image encoder is this model's
        # (one set of parameters, one name each in the state dict); device and mode follow
        object.__setattr__(self, "_inner", inner)
        self.pooling = pooling
        self.library_config = dict(inner.library_config)

    @property
    def inner(self) -> FoundationModel:
        return self._inner  # type: ignore[attr-defined]

    def _apply(self, fn: Any, recurse: bool = True) -> SliceWiseModel:
        super()._apply(fn, recurse)
        self.inner._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> SliceWiseModel:
        super().train(mode)
        self.inner.train(mode)
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, S, C, H, W) slices -> (N, D) pooled slice features."""
        n, s = images.shape[:2]
        feats = self.inner.encode_image(images.flatten(0, 1)).view(n, s, -1)
        return feats.mean(1) if self.pooling == "mean" else feats.amax(1)

    def describe(self) -> dict:
        out = super().describe()
        out.update(spatial_dims=3, slices=self.preprocess.slices, slice_pooling=self.pooling)
        out["inner"] = self.inner.describe()
        return out


def load_slicewise(name: str, **kwargs: Any) -> SliceWiseModel:
    """``slices:<2D model>`` with options ``slices`` (default 16) and ``slice_pooling``
    (``mean`` or ``max``); every other option goes to the 2D model."""
    from clinadapt.models import load_model

    inner_name = name[len(PREFIX) :]
    if not inner_name:
        raise ConfigError("slices: needs a 2D model name, e.g. slices:tiny-resnet")
    slices = kwargs.pop("slices", 16)
    pooling = kwargs.pop("slice_pooling", "mean")
    if not isinstance(slices, int) or isinstance(slices, bool) or slices < 1:
        raise ConfigError(f"model option slices must be a positive int, got {slices!r}")
    if pooling not in ("mean", "max"):
        raise ConfigError(f"model option slice_pooling must be 'mean' or 'max', got {pooling!r}")
    device = kwargs.pop("device", "cpu")
    inner = load_model(inner_name, **kwargs)
    if getattr(inner, "spatial_dims", 2) != 2:
        raise ConfigError(f"slices: wraps a 2D model; {inner_name!r} is already a 3D backbone")
    model = SliceWiseModel(inner, slices, pooling)
    model.options = {**inner.options, "slices": slices, "slice_pooling": pooling}
    return model.to(device).eval()
