"""The one interface every backbone presents, whatever library it comes from."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.models.preprocessing import LUMA_WEIGHTS, Preprocessing
from clinadapt.models.stages import Images, adapt_channels, device_stage, host_stage

__all__ = [
    "LUMA_WEIGHTS",
    "FoundationModel",
    "Preprocessing",
    "adapt_channels",
    "to_model_input",
]


def to_model_input(pp: Preprocessing, images: Images) -> torch.Tensor:
    """Turn uint8 images into the normalised batch ``pp`` describes (see :class:`Preprocessing`):
    the host stage and the device stage of :mod:`clinadapt.models.stages` in a row, here."""
    return device_stage(pp, host_stage(pp, images))


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
