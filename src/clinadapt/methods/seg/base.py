"""Segmentation methods: the base classes, evaluation prompts, and one way to predict a test set.

A segmentation method works on a promptable segmenter (SAM, MedSAM, SAM 2) or, for the U-Net
baseline, on its own network. Prompts for evaluation are derived from each test image's
reference mask the way published evaluations do it (a jittered box, k points, ...), seeded by
the run's seed and the image's position in its source, so every method and every corrupted copy
of an image sees the same prompt: a comparison holds the prompt fixed.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.errors import DataError
from clinadapt.methods.base import Context, Method, Options
from clinadapt.progress import progress

if TYPE_CHECKING:
    from clinadapt.segmentation import Prompts, Segmenter

PromptKind = Literal["box", "points", "box+points", "mask", "none"]
# MedSAM perturbs each box side outwards by 0..20 px on 1024x1024 inputs (train_one_gpu.py,
# bbox_shift=20); on another image size the same relative jitter is 20 * size / 1024 pixels.
JITTER_REFERENCE_SIZE = 1024


class PromptOptions(Options):
    """How prompts are derived from a reference mask (for training and for evaluation)."""

    prompt: PromptKind = Field(
        "box",
        description="box, points, box+points, mask (the reference itself), or none (a learned "
        "default prompt, SAMed's prompt-free use; needs training)",
    )
    jitter: int = Field(
        20,
        ge=0,
        description="boxes: each side moved outwards by 0..jitter px of a 1024-px image "
        "(MedSAM's 0-20 px), scaled to the image's size",
    )
    points: int = Field(1, ge=1, description="foreground points per object (1, 3, 5 as published)")
    negatives: int = Field(0, ge=0, description="background points per object")
    point_mode: Literal["random", "center"] = Field(
        "random", description="points uniform in the object, or its centre first (SAM paper)"
    )
    per: Literal["class", "component"] = Field(
        "class", description="one prompt per class present, or per connected component"
    )


def image_jitter(jitter: int, shape: tuple[int, ...]) -> int:
    """``jitter`` px of a 1024-px image, in pixels of an image of ``shape``."""
    return round(jitter * max(shape[:2]) / JITTER_REFERENCE_SIZE)


def derive_prompts(mask: np.ndarray, options: PromptOptions, rng: np.random.Generator):
    """Prompts for the objects of one reference label map (DerivedPrompts of seg-models)."""
    from clinadapt.segmentation import prompts_from_mask

    kind = "box" if options.prompt == "none" else options.prompt
    return prompts_from_mask(
        mask,
        kind,
        per=options.per,
        jitter=image_jitter(options.jitter, mask.shape),
        k=options.points,
        negatives=options.negatives,
        point_mode=options.point_mode,
        seed=rng,
    )


def prompt_rng(seed: int, ds: SegmentationDataset, i: int) -> np.random.Generator:
    """The prompt generator of image ``i``: fixed by the seed and the image's source position."""
    return np.random.default_rng([int(seed), int(ds.index[i])])


def describe_prompts(options: PromptOptions) -> dict[str, Any]:
    """What the record says about the prompts."""
    return {
        "source": "none (learned default prompt)"
        if options.prompt == "none"
        else "derived from each test image's reference mask, seeded per image",
        **options.model_dump(include=set(PromptOptions.model_fields)),
        "jitter_reference_px": JITTER_REFERENCE_SIZE,
    }


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
    Options: ClassVar[type[Options]] = PromptOptions

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
        """Masks for every image of ``test`` with prompts derived from its references."""
        return predict_with_prompts(model, test, options, ctx)  # type: ignore[arg-type]


def class_masks(out: Any, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """(C,H,W) booleans: the union of the masks each prompt gave for its class."""
    masks = np.zeros((num_classes, *shape), dtype=bool)
    pred = out.masks.cpu().numpy()
    for m, c in zip(pred, np.asarray(out.class_ids), strict=True):
        if 1 <= c <= num_classes:
            masks[c - 1] |= m
    return masks


@torch.no_grad()
def predict_with_prompts(
    seg: Segmenter, test: SegmentationDataset, options: PromptOptions, ctx: Context, desc: str = ""
) -> SegPredictions:
    """Embed each image once, prompt it with the objects of its reference (or the learned
    default prompt), and gather one mask per class."""
    from clinadapt.segmentation import Prompts

    seg.eval()
    c = test.num_classes
    masks, prompts = [], []
    for i in progress(range(len(test)), desc or f"segment {test.name}", total=len(test)):
        image, ref = test.pair(i)
        if options.prompt == "none":
            p: Prompts | None = Prompts()
        else:
            p = derive_prompts(ref, options, prompt_rng(ctx.seed, test, i)).prompts
        if p.count == 0 and options.prompt != "none":
            masks.append(np.zeros((c, *ref.shape), dtype=bool))  # nothing to prompt: no mask
        else:
            out = seg.predict(seg.embed(image, test.modality), p)
            masks.append(class_masks(out, ref.shape, c))
        prompts.append(None if options.prompt == "none" else p)
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
