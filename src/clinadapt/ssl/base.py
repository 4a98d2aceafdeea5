"""What every self-supervised method provides to the trainer, and the registry of methods."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from clinadapt._registry import Registry
from clinadapt.models.base import FoundationModel
from clinadapt.ssl.augment import Augmenter
from clinadapt.ssl.draws import ImageDraws
from clinadapt.validate import parse_model

SSL_METHODS: Registry = Registry("pre-training method")


class Options(BaseModel):
    """Base of each method's typed options: unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SSLMethod(nn.Module, abc.ABC):
    """A backbone plus the heads and state of one self-supervised objective.

    The trainer calls :meth:`training_loss` on a [0,1] batch of unlabelled images, steps the
    optimiser over :meth:`trainable_parameters`, then calls :meth:`after_step`. Everything that
    must survive a resume lives in ``state_dict()`` (backbone, heads, teacher, centre).
    """

    name: ClassVar[str] = "ssl"
    Options: ClassVar[type[Options]] = Options
    base_lr: ClassVar[float] = 1e-3  # per 256 images (linear scaling rule)
    weight_decay: ClassVar[float] = 0.05
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    clip_grad: ClassVar[float | None] = None
    #: 2 for methods on images, 3 for methods on volumes
    spatial_dims: ClassVar[int] = 2

    def __init__(self, backbone: FoundationModel, options: Options, augment: Augmenter) -> None:
        super().__init__()
        self.backbone = backbone
        self.options = options
        self.augment = augment

    @classmethod
    def parse_options(cls, options: dict[str, Any] | None) -> Options:
        """Validate a dict of method options, naming the method and field on error."""
        return parse_model(cls.Options, options, f"pre-training method {cls.name!r}")

    @abc.abstractmethod
    def training_loss(
        self, images: torch.Tensor, gen: ImageDraws, step: int, total: int
    ) -> torch.Tensor:
        """The loss of one batch of [0,1] images (views drawn from ``gen``, one generator per
        image) at ``step`` of ``total``. Under several processes ``images`` is this process's
        part of the global batch and the loss its share of the global batch's loss (the
        processes' losses sum to it; :mod:`clinadapt.ssl.collective`)."""

    def forward(self, images: torch.Tensor, gen: ImageDraws, step: int, total: int) -> torch.Tensor:
        """:meth:`training_loss` (what ``DistributedDataParallel`` calls)."""
        return self.training_loss(images, gen, step, total)

    def after_step(self, step: int, total: int) -> None:
        """Update state outside the optimiser (a momentum teacher) after ``step``."""

    def before_optimizer_step(self, step: int, total: int) -> None:
        """Adjust gradients before the optimiser step (e.g. keep a layer frozen early on)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def export_backbone(self) -> FoundationModel:
        """The backbone to save and evaluate (DINO: the teacher's)."""
        return self.backbone

    def diagnostics(self) -> dict[str, Any]:
        """Health figures of the last step; ``collapsed`` is True when training has collapsed."""
        return {"collapsed": False}

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary of the method's settings."""
        return {"method": self.name, "options": self.options.model_dump()}
