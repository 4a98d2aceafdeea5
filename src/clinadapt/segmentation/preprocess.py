"""Each segmenter's own input rule, and the frame that maps image pixels to model pixels and back.

Three published rules (``SegPreprocessing``):

- ``sam`` (segment-anything ``SamPredictor``): resize the longest side to 1024 (bilinear,
  antialiased; ``ResizeLongestSide``), normalise with ImageNet statistics, pad bottom/right with
  zeros to 1024x1024; logits come out at 256x256, are upsampled to 1024, cropped to the resized
  area and upsampled to the image (``Sam.postprocess_masks``); mask = logit > 0.
- ``medsam`` (MedSAM ``MedSAM_Inference.py``): squash-resize to 1024x1024 (bicubic, antialiased;
  skimage ``order=3``), min-max scale to [0, 1], no ImageNet normalisation; boxes scaled by
  1024 / (W, H); the 256x256 logits go through a sigmoid, the probabilities are upsampled to the
  image and thresholded at 0.5.
- ``sam2`` (SAM 2 ``SAM2Transforms``): squash-resize to 1024x1024 (bilinear), ImageNet
  statistics; logits upsampled straight to the image; mask = logit > 0.

Raw intensities (any image that is not uint8 and not already in [0, 1]) are first brought to
[0, 1] by MedSAM's data rule (``pre_CT_MR.py``): CT clipped to window level 40 / width 400 HU;
other modalities clipped to the 0.5-99.5 percentiles of their non-zero values (zeros stay 0).
uint8 images are taken as display-ready (divided by 255), as every SAM/MedSAM inference script
does with PNG input. Grey images become RGB by the project's rule (models/base.py: replicate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from clinadapt.errors import DataError
from clinadapt.models.base import adapt_channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MedSAM pre_CT_MR.py: WINDOW_LEVEL = 40, WINDOW_WIDTH = 400 (abdomen soft tissue)
CT_WINDOW = (40.0, 400.0)
# MedSAM pre_CT_MR.py: np.percentile(image_data[image_data > 0], 0.5 / 99.5)
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class SegPreprocessing:
    """How a segmenter turns an image into its input and its low-resolution logits into a mask."""

    rule: Literal["sam", "medsam", "sam2"]
    size: int = 1024
    resize: Literal["longest-side", "squash"] = "longest-side"
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    normalize: Literal["imagenet", "minmax"] = "imagenet"
    # what is interpolated up to the image: logits (threshold 0) or probabilities (0.5)
    upsample: Literal["logits", "probs"] = "logits"
    ct_window: tuple[float, float] = CT_WINDOW
    percentiles: tuple[float, float] = PERCENTILES

    @property
    def pad(self) -> bool:
        return self.resize == "longest-side"

    def to_dict(self) -> dict:
        return asdict(self)


def sam_rule(size: int = 1024) -> SegPreprocessing:
    return SegPreprocessing("sam", size, "longest-side", "bilinear", "imagenet", "logits")


def medsam_rule(size: int = 1024) -> SegPreprocessing:
    return SegPreprocessing("medsam", size, "squash", "bicubic", "minmax", "probs")


def sam2_rule(size: int = 1024) -> SegPreprocessing:
    return SegPreprocessing("sam2", size, "squash", "bilinear", "imagenet", "logits")


RULES = {"sam": sam_rule, "medsam": medsam_rule, "sam2": sam2_rule}


@dataclass(frozen=True)
class Frame:
    """Where one image sits in the model input: its size, its resized size, the input side."""

    original: tuple[int, int]  # (H, W) of the image
    resized: tuple[int, int]  # (h, w) inside the model input, before padding
    size: int  # the square model input side S

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): model pixels per image pixel along x and y."""
        return self.resized[1] / self.original[1], self.resized[0] / self.original[0]

    def coords_to_model(self, xy: torch.Tensor) -> torch.Tensor:
        """Image (x, y) coordinates in the last axis -> model-input coordinates."""
        sx, sy = self.scale
        factor = torch.tensor([sx, sy], dtype=xy.dtype, device=xy.device)
        return xy * factor

    def boxes_to_model(self, boxes: torch.Tensor) -> torch.Tensor:
        """(..., 4) x1, y1, x2, y2 boxes in image pixels -> model-input pixels."""
        return self.coords_to_model(boxes.reshape(*boxes.shape[:-1], 2, 2)).reshape(boxes.shape)


def longest_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """segment-anything's ``ResizeLongestSide.get_preprocess_shape``: round half up."""
    scale = size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def frame_for(shape: tuple[int, int], rule: SegPreprocessing) -> Frame:
    """The frame of an (H, W) image under ``rule``."""
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise DataError(f"image of size {h}x{w} is empty")
    resized = longest_side_shape(h, w, rule.size) if rule.pad else (rule.size, rule.size)
    return Frame((h, w), resized, rule.size)


def to_unit_range(
    image: np.ndarray | torch.Tensor, modality: str | None, rule: SegPreprocessing
) -> np.ndarray:
    """Pixels in [0, 1] as float32 (H, W) or (H, W, C), by the raw-intensity rule above."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DataError(f"image dtype {arr.dtype} is not an intensity image; give uint8 or numbers")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise DataError(
            f"image must be (H,W) grey or (H,W,C) with C in 1, 3, 4; got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError("image holds NaN or infinite values")
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        return arr
    if (modality or "").lower() == "ct":
        level, width = rule.ct_window
        lo, hi = level - width / 2, level + width / 2
        return (np.clip(arr, lo, hi) - lo) / (hi - lo)
    nonzero = arr[arr > 0]
    if nonzero.size == 0:
        return np.zeros_like(arr)
    lo, hi = np.percentile(nonzero, rule.percentiles)
    if hi <= lo:
        return (arr > 0).astype(np.float32) * float(hi > 0)
    out = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    out[arr == 0] = 0.0
    return out


def prepare_image(
    image: np.ndarray | torch.Tensor, rule: SegPreprocessing, modality: str | None = None
) -> tuple[torch.Tensor, Frame]:
    """One image -> the (3, S, S) model input and its frame."""
    unit = to_unit_range(image, modality, rule)
    frame = frame_for(unit.shape[:2], rule)
    x = torch.from_numpy(np.ascontiguousarray(unit))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    x = adapt_channels(x, 3)
    if tuple(x.shape[-2:]) != frame.resized:
        x = F.interpolate(
            x, size=frame.resized, mode=rule.interpolation, align_corners=False, antialias=True
        )
    if rule.normalize == "minmax":
        lo, hi = x.amin(), x.amax()
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
    else:
        x = x.clamp(0.0, 1.0)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    if rule.pad:
        x = F.pad(x, (0, rule.size - frame.resized[1], 0, rule.size - frame.resized[0]))
    return x[0].contiguous(), frame


def mask_to_model(
    mask: torch.Tensor, frame: Frame, mask_size: int, rule: SegPreprocessing
) -> torch.Tensor:
    """(P, H, W) mask logits at image resolution -> (P, 1, m, m) in the model's low-res frame."""
    x = mask[:, None].float()
    x = F.interpolate(x, size=frame.resized, mode="bilinear", align_corners=False)
    if rule.pad:
        x = F.pad(
            x,
            (0, frame.size - frame.resized[1], 0, frame.size - frame.resized[0]),
            value=x.min().item(),
        )
    return F.interpolate(
        x, size=(mask_size, mask_size), mode="bilinear", align_corners=False, antialias=True
    )


def upsample(low_res: torch.Tensor, frame: Frame, rule: SegPreprocessing) -> torch.Tensor:
    """(P, h, w) low-resolution logits -> (P, H, W) probabilities at the image's resolution."""
    x = low_res[:, None].float()
    if rule.upsample == "probs":
        x = torch.sigmoid(x)
    if rule.pad:  # Sam.postprocess_masks: to the input size, crop the padding, to the image
        x = F.interpolate(x, size=(frame.size, frame.size), mode="bilinear", align_corners=False)
        x = x[..., : frame.resized[0], : frame.resized[1]]
    x = F.interpolate(x, size=frame.original, mode="bilinear", align_corners=False)
    if rule.upsample == "logits":
        x = torch.sigmoid(x)
    return x[:, 0]
