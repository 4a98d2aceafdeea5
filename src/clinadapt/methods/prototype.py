"""`prototype`: nearest class mean of frozen features (cosine by default, or Euclidean)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.methods.base import METHODS, Context
from clinadapt.methods.frozen import (
    FeatureHead,
    FrozenFeatureMethod,
    FrozenOptions,
    LabelledFeatures,
)

ABSENT = -1e4  # logit of a class with no support image: it can never be predicted


class PrototypeOptions(FrozenOptions):
    metric: Literal["cosine", "euclidean"] = Field(
        "cosine", description="cosine on L2-normalised features, or squared Euclidean distance"
    )
    scale: float | None = Field(
        None,
        gt=0,
        description="logit scale: times the cosine (default 10) or times minus the squared "
        "distance (default 1, as prototypical networks)",
    )


class PrototypeHead(FeatureHead):
    """Logits from the similarity of each feature to each class mean."""

    def __init__(
        self,
        prototypes: torch.Tensor,
        present: torch.Tensor,
        cosine: torch.Tensor | bool,
        scale: torch.Tensor | float,
    ) -> None:
        super().__init__(
            prototypes=torch.as_tensor(prototypes, dtype=torch.float32),
            present=torch.as_tensor(present, dtype=torch.bool),
            cosine=torch.as_tensor(cosine, dtype=torch.bool),
            scale=torch.as_tensor(scale, dtype=torch.float32),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        if bool(self.cosine):
            logits = self.scale * F.normalize(f, dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        else:
            logits = -self.scale * torch.cdist(f, self.prototypes).square()
        return logits.masked_fill(~self.present, ABSENT)


def class_means(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) mean feature per class and (K,) whether the class has any example."""
    means = np.zeros((num_classes, x.shape[1]), dtype=np.float64)
    counts = np.bincount(y, minlength=num_classes)
    np.add.at(means, y, x.astype(np.float64))
    present = counts > 0
    means[present] /= counts[present, None]
    return means.astype(np.float32), present


@METHODS.register("prototype")
class Prototype(FrozenFeatureMethod):
    """Classify by similarity to the mean feature of each class's support images."""

    name = "prototype"
    changes = "class-mean prototypes (no training)"
    Options = PrototypeOptions
    head_type = PrototypeHead

    def fit_head(
        self,
        model: ImageClassifier,
        support: LabelledFeatures,
        val: LabelledFeatures | None,
        data: ClinicalDataset,
        options: PrototypeOptions,
        ctx: Context,
    ) -> tuple[PrototypeHead, dict[str, Any]]:
        cosine = options.metric == "cosine"
        x = support.x
        if cosine:  # the mean direction of unit vectors, so each image counts once
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        means, present = class_means(x, support.y, data.num_classes)
        scale = options.scale if options.scale is not None else (10.0 if cosine else 1.0)
        head = PrototypeHead(torch.from_numpy(means), torch.from_numpy(present), cosine, scale)
        return head, {"metric": options.metric, "scale": scale}
