"""The non-foundation baseline: a U-Net trained from scratch on the same data, loss and budget.

MONAI's ``UNet`` (residual units, as in MONAI's 2D segmentation tutorials) with C+1 output
channels (background and the classes), trained with Dice + cross-entropy (MONAI
``DiceCELoss``, the multi-class form of MedSAM's Dice + BCE) by AdamW for the same epochs,
batch size and validation-Dice model selection as ``seg-finetune``. Images are squash-resized
to ``size`` and z-scored per image (nnU-Net's rule for non-CT images); the logits are resized
back to each image. No prompt is used: the U-Net predicts every class everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.methods.base import METHODS, Context, Options
from clinadapt.methods.seg.base import SegMethod, SegPredictions
from clinadapt.methods.seg.train import fit_epochs
from clinadapt.progress import progress
from clinadapt.segmentation.predict import MaskModel, ProbMap


class UNetOptions(Options):
    channels: list[int] = Field(
        [16, 32, 64, 128], description="feature channels per level (each level halves the size)"
    )
    num_res_units: int = Field(2, ge=0, description="residual units per block (MONAI UNet)")
    norm: Literal["instance", "batch"] = Field(
        "instance",
        description="normalisation layers: instance (MONAI UNet's default) or batch (what "
        "BatchNorm test-time methods such as intent adapt)",
    )
    size: int | None = Field(
        None,
        ge=16,
        description="input side in pixels (default: the first training image's, "
        "rounded to a multiple of 2^levels, at most 256)",
    )
    epochs: int = Field(10, ge=1, description="passes over the training images (as seg-finetune)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (from scratch: 1e-3)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (as seg-finetune)")
    patience: int = Field(
        5, ge=1, description="stop after this many epochs without a better validation Dice"
    )


def _to_input(image: np.ndarray, channels: int, size: int) -> torch.Tensor:
    x = torch.as_tensor(image, dtype=torch.float32)
    x = x[None] if x.ndim == 2 else x[..., :3].permute(2, 0, 1)
    if x.shape[0] != channels:
        x = x.mean(0, keepdim=True) if channels == 1 else x.expand(3, -1, -1)
    x = (x - x.mean()) / (x.std() + 1e-6)
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def _to_target(mask: np.ndarray, size: int) -> torch.Tensor:
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return F.interpolate(m, size=(size, size), mode="nearest")[0].long()


class UNetPredictor(torch.nn.Module, MaskModel):
    """MONAI UNet plus what it needs to read images of any size: channels and input side.

    As a :class:`MaskModel` it gives a softmax over background and the C classes per image, so
    segmentation test-time methods adapt it like a promptable segmenter (prompts are ignored).
    """

    name = "monai-unet"

    def __init__(self, num_classes: int, in_channels: int, size: int, options: UNetOptions) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        levels = len(options.channels)
        self.net = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=num_classes + 1,
            channels=tuple(options.channels),
            strides=(2,) * (levels - 1),
            num_res_units=options.num_res_units,
            norm=options.norm,
        )
        self.in_channels, self.size, self.num_classes = in_channels, size, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": "unet",
            "task": "segmentation",
            "in_channels": self.in_channels,
            "input_size": self.size,
            "parameters": sum(p.numel() for p in self.parameters()),
            "source": "random init (trained from scratch)",
        }

    def mask_probs(self, images: Sequence[np.ndarray], prompts: Sequence[Any]) -> list[ProbMap]:
        """Softmax maps (background first) of each image at its own size; prompts are unused."""
        dev = next(self.parameters()).device
        x = torch.stack([_to_input(im, self.in_channels, self.size) for im in images]).to(dev)
        logits = self(x)
        ids = np.arange(self.num_classes + 1)
        out = []
        for j, im in enumerate(images):
            up = F.interpolate(
                logits[j : j + 1], size=im.shape[:2], mode="bilinear", align_corners=False
            )
            out.append(ProbMap(torch.softmax(up[0], 0), exclusive=True, class_ids=ids))
        return out

    @torch.no_grad()
    def segment(self, image: np.ndarray) -> np.ndarray:
        """(C,H,W) boolean masks of one image (argmax over background and classes)."""
        self.eval()
        labels = self.mask_probs([image], [None])[0].label_map()
        return np.stack([labels == c for c in range(1, self.num_classes + 1)])


def _input_size(image: np.ndarray, levels: int) -> int:
    m = 2 ** (levels - 1)
    side = min(max(image.shape[:2]), 256)
    return max(m, round(side / m) * m)


@METHODS.register("unet")
class UNetBaseline(SegMethod):
    """A U-Net from scratch: the non-foundation baseline every segmentation paper reports."""

    name = "unet"
    default_target = "full"
    default_model = UNetPredictor.name
    uses_segmenter = False
    Options: ClassVar[type[Options]] = UNetOptions

    def build(self, train: SegmentationDataset, options: Options, ctx: Context) -> UNetPredictor:
        first = train.image(0)
        size = options.size or _input_size(first, len(options.channels))  # type: ignore[attr-defined]
        torch.manual_seed(ctx.seed)
        in_ch = 1 if first.ndim == 2 else 3
        return UNetPredictor(train.num_classes, in_ch, size, options).to(ctx.device)  # type: ignore[arg-type]

    def fit(
        self,
        model: UNetPredictor,
        train: SegmentationDataset,
        val: SegmentationDataset | None,
        options: Options,
        ctx: Context,
    ) -> dict[str, Any]:
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

        def batch_loss(pos: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
            x = torch.stack(
                [_to_input(train.image(int(i)), model.in_channels, model.size) for i in pos]
            )
            y = torch.stack([_to_target(train.mask(int(i)), model.size) for i in pos])
            return loss_fn(model(x.to(ctx.device)).float(), y.to(ctx.device))

        def predict(ds: SegmentationDataset) -> SegPredictions:
            return self.predict(model, ds, options, ctx)

        return fit_epochs(model, train, val, options, ctx, batch_loss, predict, desc="unet epoch")

    def predict(
        self, model: UNetPredictor, test: SegmentationDataset, options: Options, ctx: Context
    ) -> SegPredictions:
        masks = [
            model.segment(test.image(i))
            for i in progress(range(len(test)), f"segment {test.name}", total=len(test))
        ]
        return SegPredictions(masks, [None] * len(test))
