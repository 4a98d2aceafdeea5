"""`intent`: InTEnt, integrated entropy weighting for single-image test-time adaptation
(Dong, Konz, Gu & Mazurowski, CVPR 2024 DEF-AI-MIA workshop; code: mazurowski-lab/
single-image-test-time-adaptation, ``main_sitta.py``).

For each test image on its own, every BatchNorm layer's statistics are set to
``(1 - r) * source + r * test`` for r in 0, 0.2, ..., 1 (``candidates`` = 6), where the test
statistics are the image's own (a train-mode pass with momentum 1, as the authors' networks use);
each setting gives a prediction. The predictions are averaged with weights
``softmax(normalise(-balanced entropy))``: the balanced entropy of a prediction is the mean of
its mean pixel entropy over the predicted foreground and over the predicted background (the
plain mean when nothing is foreground), normalised by min-max over the candidates — the
authors' ``ratio`` weighting with ``normalize=True``. ``weighting="entropy"`` uses their plain
one instead (softmax of 1 - mean entropy in bits). No parameter is trained, nothing carries over
from one image to the next, and the source model is never changed.

It needs BatchNorm layers (source statistics to interpolate): a U-Net, not SAM, whose image
encoder normalises with LayerNorm.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.methods.base import METHODS, Context, Options
from clinadapt.methods.tta.seg.base import SegStreamResult, SegTTAMethod
from clinadapt.progress import progress
from clinadapt.segmentation.predict import MaskModel, ProbMap
from clinadapt.segmentation.prompts import Prompts

BN = nn.modules.batchnorm._BatchNorm


class InTEntOptions(Options):
    candidates: int = Field(
        6, ge=2, description="statistics settings r = 0, 1/(n-1), ..., 1 (InTEnt: 6)"
    )
    weighting: Literal["balanced", "entropy"] = Field(
        "balanced",
        description="balanced: foreground/background entropy balance, min-max normalised "
        "(InTEnt); entropy: 1 - mean entropy in bits",
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the weights (1.0)")


def batchnorms(model: nn.Module) -> list[BN]:
    return [m for m in model.modules() if isinstance(m, BN) and m.running_mean is not None]


@torch.no_grad()
def image_statistics(model: Any, layers: list[BN], image: np.ndarray, prompts: Prompts):
    """Each layer's statistics of one image (a train-mode pass with momentum 1)."""
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in layers]
    for m in layers:
        m.momentum = 1.0
        m.train()
    try:
        model.mask_probs([image], [prompts])
        stats = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    finally:
        for m, (momentum, mean, var) in zip(layers, saved, strict=True):
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.eval()
    return stats


def _binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def balanced_entropy(m: ProbMap) -> float:
    """Mean of the mean entropy over predicted foreground and over predicted background.

    For K independent maps (or a softmax's classes against background) each map's balance is
    computed and averaged; the authors' code is the binary case.
    """
    maps = m.probs[1:] if m.exclusive else m.probs
    values = []
    for p in maps:
        ent = _binary_entropy_bits(p)
        fg = p >= 0.5
        if bool(fg.any()) and bool((~fg).any()):
            values.append(0.5 * (float(ent[fg].mean()) + float(ent[~fg].mean())))
        else:
            values.append(float(ent.mean()))
    return float(np.mean(values)) if values else 0.0


def mean_entropy_bits(m: ProbMap) -> float:
    maps = m.probs[1:] if m.exclusive else m.probs
    return float(_binary_entropy_bits(maps).mean()) if maps.numel() else 0.0


def candidate_weights(maps: Sequence[ProbMap], weighting: str, temperature: float) -> torch.Tensor:
    """The softmax weights of the candidate predictions (authors' ``get_score``)."""
    if weighting == "entropy":
        scores = torch.tensor([1.0 - mean_entropy_bits(m) for m in maps])
    else:
        scores = -torch.tensor([balanced_entropy(m) for m in maps])
        span = scores.max() - scores.min()
        scores = (scores - scores.min()) / span if span > 0 else torch.zeros_like(scores)
    return torch.softmax(scores / temperature, dim=0)


@METHODS.register("intent")
class InTEnt(SegTTAMethod):
    """Integrate predictions under interpolated normalisation statistics, per image."""

    name = "intent"
    default_target = "none"  # nothing is trained
    Options = InTEntOptions

    def adapt_masks(
        self,
        model: MaskModel,
        stream: Any,
        prompts: Sequence[Prompts],
        options: InTEntOptions,
        ctx: Context,
    ) -> SegStreamResult:
        if not isinstance(model, nn.Module) or not batchnorms(model):
            name = getattr(model, "name", type(model).__name__)
            raise IncompatibleError(
                f"intent interpolates BatchNorm statistics, but model {name!r} has no "
                "BatchNorm layer (SAM's encoder uses LayerNorm): use seg-tent, or a U-Net source"
            )
        own = copy.deepcopy(model).eval()
        layers = batchnorms(own)
        source = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
        rates = [i / (options.candidates - 1) for i in range(options.candidates)]
        out: list[np.ndarray] = []
        for i in progress(range(len(stream)), f"intent {stream.name}", total=len(stream)):
            image, p = stream.image(i), prompts[i]
            test = image_statistics(own, layers, image, p)
            candidates: list[ProbMap] = []
            with torch.no_grad():
                for r in rates:
                    for m, (sm, sv), (tm, tv) in zip(layers, source, test, strict=True):
                        m.running_mean.copy_((1 - r) * sm + r * tm)
                        m.running_var.copy_((1 - r) * sv + r * tv)
                    candidates.append(own.mask_probs([image], [p])[0])
            weights = candidate_weights(candidates, options.weighting, options.temperature)
            probs = sum(w * c.probs.float() for w, c in zip(weights, candidates, strict=True))
            first = candidates[0]
            out.append(
                ProbMap(probs, first.exclusive, first.class_ids).class_masks(stream.num_classes)
            )
        for m, (sm, sv) in zip(layers, source, strict=True):  # the copy ends as the source
            m.running_mean.copy_(sm)
            m.running_var.copy_(sv)
        return SegStreamResult(out)
