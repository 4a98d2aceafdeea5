"""The one interface every backbone presents, whatever library it comes from."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.errors import DataError, IncompatibleError
from clinadapt.models.preprocessing import LUMA_WEIGHTS, Preprocessing

__all__ = [
    "LUMA_WEIGHTS",
    "FoundationModel",
    "Preprocessing",
    "adapt_channels",
    "to_model_input",
]


def to_model_input(
    pp: Preprocessing, images: torch.Tensor | np.ndarray | Sequence[np.ndarray]
) -> torch.Tensor:
    """Turn uint8 images into the normalised batch ``pp`` describes (see :class:`Preprocessing`)."""
    x = _to_float_nchw(images)
    # grey for an RGB model: resize the one channel, then replicate it (the same values)
    replicate = x.shape[1] == 1 and pp.in_chans == 3
    if not replicate:
        x = adapt_channels(x, pp.in_chans)
    if tuple(x.shape[-2:]) != tuple(pp.image_size):
        mode = pp.interpolation if pp.interpolation in ("bilinear", "bicubic") else "bilinear"
        x = F.interpolate(x, size=pp.image_size, mode=mode, align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    if replicate:
        x = adapt_channels(x, pp.in_chans)
    mean = torch.tensor(pp.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pp.std, dtype=x.dtype).view(1, -1, 1, 1)
    if mean.shape[1] != x.shape[1]:
        mean = mean.mean().expand(1, x.shape[1], 1, 1)
        std = std.mean().expand(1, x.shape[1], 1, 1)
    return (x - mean) / std


def _to_float_nchw(images: torch.Tensor | np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    if isinstance(images, (list, tuple)):
        shapes = {np.asarray(im).shape for im in images}
        if len(shapes) != 1:
            raise DataError(
                f"images in one batch have different shapes {sorted(shapes)}; resize first"
            )
        images = np.stack([np.asarray(im) for im in images])
    if not isinstance(images, torch.Tensor):
        array = np.asarray(images)  # read-only (cached datasets): torch needs its own copy
        images = torch.as_tensor(array if array.flags.writeable else array.copy())
    t = images
    if t.ndim == 3:  # N,H,W grey
        t = t.unsqueeze(-1)
    if t.ndim != 4:
        raise DataError(f"expected images as (N,H,W) or (N,H,W,C), got shape {tuple(t.shape)}")
    t = t.permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if t.is_floating_point():
        return t.float()
    raise DataError(f"images must be uint8 or float in [0,1], got dtype {t.dtype}")


def adapt_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Apply the documented grey<->RGB rule to a float (N,C,H,W) batch."""
    c = x.shape[1]
    if c == 4 and in_chans != 4:  # RGBA: drop alpha
        x, c = x[:, :3], 3
    if c == in_chans:
        return x
    if c == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and in_chans == 1:
        w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise DataError(
        f"images have {c} channels but the model takes {in_chans}; only grey<->RGB is "
        "converted automatically"
    )


class FoundationModel(nn.Module, metaclass=abc.ABCMeta):
    """A backbone with a common face: ``encode_image``, optional ``encode_text``, preprocessing.

    ``image_encoder`` is the module whose parameters targets open or inject into; ``text_encoder``
    (CLIP-like models only) likewise. ``spec`` says where the model came from.
    """

    def __init__(
        self,
        name: str,
        family: str,
        image_encoder: nn.Module,
        feature_dim: int,
        preprocess: Preprocessing,
        *,
        text_encoder: nn.Module | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        logit_scale: float | None = None,
        source: str = "random init",
    ) -> None:
        super().__init__()
        self.name = name
        self.family = family
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.feature_dim = int(feature_dim)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._logit_scale = logit_scale
        self.source = source
        self.options: dict[str, Any] = {}  # the model options it was built with
        # what the library needs to build the architecture again (exports): timm model_args,
        # open_clip model_cfg/preprocess_cfg; transformers models carry their own config
        self.library_config: dict[str, Any] = {}

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None

    @property
    def logit_scale(self) -> float:
        if self._logit_scale is None:
            raise IncompatibleError(f"model {self.name!r} has no text tower and so no logit scale")
        return float(self._logit_scale)

    @abc.abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Map a preprocessed (N,C,H,W) batch to (N, feature_dim) features."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Map a list of strings to (N, feature_dim) text features (CLIP-like models only)."""
        raise IncompatibleError(
            f"model {self.name!r} ({self.family}) has no text tower; zero-shot needs a CLIP-like "
            "model such as 'clip-vit-b16' or 'biomedclip'"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def describe(self) -> dict:
        """A JSON-able summary for result records."""
        n = sum(p.numel() for p in self.parameters())
        return {
            "name": self.name,
            "family": self.family,
            "feature_dim": self.feature_dim,
            "has_text": self.has_text,
            "preprocess": self.preprocess.to_dict(),
            "parameters": n,
            "source": self.source,
            "options": dict(self.options),
        }
