"""Segmentation methods: the base class and one way to predict a test set with its prompts.

A segmentation method works on a promptable segmenter (SAM, MedSAM, SAM 2) or, for the U-Net
baseline, on its own network. Prompts are part of each example: the run's prompt protocol
derives them from each image's reference (``SegmentationDataset.prompts``), seeded by the run's
seed and the image's position in its source, so every method and every corrupted copy of an
image sees the same prompt: a comparison holds the prompt fixed.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.errors import DataError
from clinadapt.methods.base import Context, Method, Options
from clinadapt.progress import progress

if TYPE_CHECKING:
    from clinadapt.segmentation import Prompts, Segmenter


@dataclass
class SegPredictions:
    """A test set's predictions in its own order: (C,H,W) boolean masks, and the prompts used."""

    masks: list[np.ndarray]
    prompts: list[Any] = field(default_factory=list)  # Prompts per image (None: no prompt)
    info: dict[str, Any] = field(default_factory=dict)


class SegMethod(Method):
    """A segmentation method: fits (or not) a predictor, then predicts a test set's masks."""

    task: ClassVar[str] = "segmentation"
    kind = "fit"
    default_target: ClassVar[str] = "none"
    #: False for methods that bring their own network (the U-Net baseline) ...
    uses_segmenter: ClassVar[bool] = True
    #: ... whose name is then the run's model (None: the task's default segmenter)
    default_model: ClassVar[str | None] = None
    Options: ClassVar[type[Options]] = Options

    @abc.abstractmethod
    def fit(
        self,
        model: Any,
        train: SegmentationDataset,
        val: SegmentationDataset | None,
        options: Options,
        ctx: Context,
    ) -> dict[str, Any]:
        """Adapt ``model`` on ``train`` (in place); return a training summary."""

    def build(self, train: SegmentationDataset, options: Options, ctx: Context) -> torch.nn.Module:
        """The method's own network (methods with ``uses_segmenter = False``)."""
        raise DataError(f"method {self.name!r} works on a segmenter; it builds no network")

    def predict(
        self, model: Any, test: SegmentationDataset, options: Options, ctx: Context
    ) -> SegPredictions:
        """Masks for every image of ``test`` with the prompts derived from its references."""
        return predict_with_prompts(model, test, ctx)


def class_masks(out: Any, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """(C,H,W) booleans: the union of the masks each prompt gave for its class."""
    masks = np.zeros((num_classes, *shape), dtype=bool)
    pred = out.masks.cpu().numpy()
    for m, c in zip(pred, np.asarray(out.class_ids), strict=True):
        if 1 <= c <= num_classes:
            masks[c - 1] |= m
    return masks


def image_prompts(ds: SegmentationDataset, i: int) -> Prompts:
    """Image ``i``'s prompts: derived from its reference, or none (the learned default prompt)."""
    from clinadapt.segmentation import Prompts

    if ds.prompt_spec is not None and ds.prompt_spec.kind == "none":
        return Prompts()
    return ds.prompts(i).prompts


@torch.no_grad()
def predict_with_prompts(
    seg: Segmenter, test: SegmentationDataset, ctx: Context, desc: str = ""
) -> SegPredictions:
    """Embed each image once, prompt it with its objects (or the learned default prompt), and
    gather one mask per class."""
    seg.eval()
    c = test.num_classes
    masks, prompts = [], []
    for i in progress(range(len(test)), desc or f"segment {test.name}", total=len(test)):
        image, ref = test.pair(i)
        p = image_prompts(test, i)
        if p.is_empty and test.prompt_spec.kind != "none":  # no object: nothing to prompt
            masks.append(np.zeros((c, *ref.shape), dtype=bool))
        else:
            out = seg.predict(seg.embed(image, test.modality), p)
            masks.append(class_masks(out, ref.shape, c))
        prompts.append(None if p.is_empty else p)
    return SegPredictions(masks, prompts)


def fill_boxes(prompts: Prompts | None, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """The "fill the box" baseline: each box prompt's rectangle as its class's mask."""
    out = np.zeros((num_classes, *shape), dtype=bool)
    if prompts is None or prompts.boxes is None:
        return out
    for (x1, y1, x2, y2), c in zip(prompts.boxes, prompts.ids(), strict=True):
        if 1 <= c <= num_classes:
            out[c - 1, int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = True
    return out
