"""`tda`: training-free dynamic adapter (Karmanov et al., "Efficient Test-Time Adaptation of
Vision-Language Models", CVPR 2024).

Two caches of normalised test features fill up along the stream, keyed by predicted class:

- positive: every image joins the cache of its predicted class, which keeps the
  ``pos_shot_capacity`` lowest-entropy images; logits add
  ``pos_alpha * exp(-pos_beta * (1 - f . keys)) @ one_hot(classes)``;
- negative: only images of normalised entropy inside (0.2, 0.5) join, with their
  probabilities; logits subtract ``neg_alpha * exp(-neg_beta * (1 - f . keys)) @ mask``, where
  the mask marks the classes whose cached probability lies in (0.03, 1.0). The entropy is in
  nats and divided by log2 K, as the authors' ``get_entropy`` (``utils.py``) does, so the band is
  (0.289, 0.721) in H / ln K.

Each image updates the caches before its own prediction, as in the authors' code. Defaults are
the ImageNet configuration of the authors' repository (kdiAAA/TDA, ``configs/imagenet.yaml``):
positive capacity 3, alpha 2.0, beta 5.0; negative capacity 2, alpha 0.117, beta 1.0. Nothing is
trained; the base logits are the source classifier's (zero-shot CLIP in the paper).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.methods.base import (
    METHODS,
    Context,
    Options,
    StreamResult,
    TTAMethod,
    check_single_label,
)
from clinadapt.progress import progress


class TDAOptions(Options):
    pos_shot_capacity: int = Field(3, ge=1, description="images kept per class, positive cache")
    pos_alpha: float = Field(2.0, ge=0, description="weight of the positive cache logits")
    pos_beta: float = Field(5.0, ge=0, description="sharpness of the positive affinities")
    negative: bool = Field(True, description="use the negative cache")
    neg_shot_capacity: int = Field(2, ge=1, description="images kept per class, negative cache")
    neg_alpha: float = Field(0.117, ge=0, description="weight of the negative cache logits")
    neg_beta: float = Field(1.0, ge=0, description="sharpness of the negative affinities")
    neg_entropy: tuple[float, float] = Field(
        (0.2, 0.5),
        description="band of H / log2 K (H in nats, as the authors) an image must fall in to join",
    )
    neg_mask: tuple[float, float] = Field(
        (0.03, 1.0), description="probability band marking a class in a negative entry"
    )

    @model_validator(mode="after")
    def _bands(self) -> TDAOptions:
        for name in ("neg_entropy", "neg_mask"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi <= 1:
                raise ValueError(f"{name} must be (low, high) with 0 <= low < high <= 1")
        return self


class ClassCache:
    """Per predicted class, the ``capacity`` entries of lowest entropy."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[int, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}

    def add(self, cls: int, entropy: float, key: torch.Tensor, value: torch.Tensor) -> None:
        """Insert, or replace the worst entry if this one has lower entropy; keep sorted."""
        items = self.entries.setdefault(cls, [])
        if len(items) < self.capacity:
            items.append((entropy, key, value))
        elif entropy < items[-1][0]:
            items[-1] = (entropy, key, value)
        items.sort(key=lambda e: e[0])

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def logits(self, f: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """``alpha * exp(-beta * (1 - f . keys)) @ values`` for one (D,) feature."""
        items = [e for c in sorted(self.entries) for e in self.entries[c]]
        keys = torch.stack([e[1] for e in items])
        values = torch.stack([e[2] for e in items])
        affinity = keys @ f
        return alpha * torch.exp(-beta * (1.0 - affinity)) @ values


@torch.no_grad()
def tda_logits(
    logits: torch.Tensor, feats: torch.Tensor, options: TDAOptions
) -> tuple[torch.Tensor, dict[str, int]]:
    """Run TDA over a stream of (N, K) base logits and (N, D) features, in order."""
    k = logits.shape[1]
    f = F.normalize(feats.float(), dim=-1)
    pos, neg = ClassCache(options.pos_shot_capacity), ClassCache(options.neg_shot_capacity)
    lo, hi = options.neg_entropy
    mlo, mhi = options.neg_mask
    out = torch.empty_like(logits, dtype=torch.float32)
    joined_neg = 0
    for i in range(len(logits)):
        z = logits[i].float()
        p = z.softmax(-1)
        ent = float(-(p * z.log_softmax(-1)).sum())
        pred = int(z.argmax())
        pos.add(pred, ent, f[i], F.one_hot(torch.tensor(pred), k).float().to(f.device))
        if options.negative and lo < ent / math.log2(k) < hi:
            neg.add(pred, ent, f[i], ((p > mlo) & (p < mhi)).float())
            joined_neg += 1
        final = z + pos.logits(f[i], options.pos_alpha, options.pos_beta)
        if options.negative and len(neg):
            final = final - neg.logits(f[i], options.neg_alpha, options.neg_beta)
        out[i] = final
    return out, {"positive_entries": len(pos), "negative_joined": joined_neg}


@METHODS.register("tda")
class TDA(TTAMethod):
    """Blend the source logits with cache logits built from the stream; nothing is trained."""

    name = "tda"
    changes = "caches of test features"
    default_target = "none"
    Options = TDAOptions
    single_label = True  # its caches key on the arg-max class

    def adapt(
        self, model: ImageClassifier, stream: ClinicalDataset, options: TDAOptions, ctx: Context
    ) -> StreamResult:
        check_single_label(self, stream)
        model.eval()
        logits, feats = [], []
        total = -(-len(stream) // ctx.batch_size)
        with torch.no_grad():
            for x, _, _ in progress(
                ctx.batches(stream, model.preprocess), f"tda {stream.name}", total=total
            ):
                f = model.features(x.to(ctx.device))
                logits.append(model.head(f).float())
                feats.append(f.float())
        final, info = tda_logits(torch.cat(logits), torch.cat(feats), options)
        return StreamResult.of(torch.softmax(final, dim=-1), **info)
