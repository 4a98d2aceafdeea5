"""Promptable-segmenter methods: zero-shot, supervised fine-tuning and few-shot fine-tuning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field

from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.methods.base import METHODS, Context, Options
from clinadapt.methods.seg.base import SegMethod
from clinadapt.methods.seg.train import TrainOptions, train_segmenter

if TYPE_CHECKING:
    from clinadapt.segmentation import Segmenter


@METHODS.register("seg-zeroshot")
class SegZeroShot(SegMethod):
    """SAM / MedSAM / SAM 2 as released, with prompts derived from the reference masks."""

    name = "seg-zeroshot"

    def fit(self, model: Segmenter, train, val, options: Options, ctx: Context) -> dict[str, Any]:
        if train.prompt_spec is not None and train.prompt_spec.kind == "none":
            raise ConfigError(
                "seg-zeroshot: prompt 'none' needs a learned default prompt, which only training "
                "makes; use seg-finetune with target prompt-encoder (+decoder)"
            )
        return {"trained": False}


@METHODS.register("seg-finetune")
class SegFinetune(SegMethod):
    """Fine-tune on every labelled training image (MedSAM: target image-encoder+decoder)."""

    name = "seg-finetune"
    default_target = "image-encoder+decoder"
    Options: ClassVar[type[Options]] = TrainOptions

    def fit(self, model: Segmenter, train, val, options: Options, ctx: Context) -> dict[str, Any]:
        return train_segmenter(model, train, val, options, ctx)  # type: ignore[arg-type]


class FewShotOptions(TrainOptions):
    shots: int = Field(8, ge=1, description="K annotated training images, one per patient")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (MedSAM: 1e-4)")
    epochs: int = Field(20, ge=1, description="passes over the K images")


def few_shot_images(ds: SegmentationDataset, shots: int, seed: int) -> np.ndarray:
    """Positions of K annotated images with an object, from K different patients (seeded).

    Nested across K: the K-image set is the start of one seeded order of patients, so the
    4-image set holds the 2-image set. Without ``patient_id`` each image is its own patient.
    """
    has_object = np.flatnonzero(ds.labels.any(1))
    if len(has_object) == 0:
        raise DataError(f"{ds.name}: no image with an object to annotate")
    pid = ds.meta("patient_id") if ds.has_meta("patient_id") else np.arange(len(ds)).astype(str)
    patients = sorted(set(pid[has_object].tolist()))
    if shots > len(patients):
        raise DataError(
            f"{ds.name}: {shots} shots need {shots} patients with an annotated object; it has "
            f"{len(patients)}"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for p in rng.permutation(np.array(patients, dtype=object))[:shots]:
        own = has_object[pid[has_object] == p]
        chosen.append(int(own[rng.integers(len(own))]))
    return np.sort(np.array(chosen, dtype=np.int64))


@METHODS.register("seg-fewshot")
class SegFewShot(SegMethod):
    """Fine-tune on K annotated training images, patient-disjoint, with MedSAM's loss."""

    name = "seg-fewshot"
    default_target = "decoder"
    Options: ClassVar[type[Options]] = FewShotOptions

    def fit(self, model: Segmenter, train, val, options: Options, ctx: Context) -> dict[str, Any]:
        pos = few_shot_images(train, options.shots, ctx.seed)  # type: ignore[attr-defined]
        support = train.subset(pos, name=f"{train.name}[{len(pos)}-shot]")
        # K labelled images is all the protocol may see: no labelled validation set picks the
        # epoch, the run trains for its fixed number of epochs.
        summary = train_segmenter(model, support, None, options, ctx)  # type: ignore[arg-type]
        summary["support"] = {
            "images": len(support),
            "patients": sorted(set(support.meta("patient_id").tolist()))
            if support.has_meta("patient_id")
            else None,
            "positions": pos.tolist(),
        }
        return summary
