"""`knn`: k nearest support images by cosine similarity; probabilities from their votes."""

from __future__ import annotations

from typing import Any, Literal

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

EPS = 1e-12  # a class without votes gets probability ~0, not log(0)


class KNNOptions(FrozenOptions):
    # k=20 and T=0.07 with similarity-weighted votes: the k-NN evaluation of DINO
    # (Caron et al., ICCV 2021).
    k: int = Field(20, ge=1, description="neighbours voting (capped at the support size)")
    weighting: Literal["softmax", "uniform"] = Field(
        "softmax",
        description="softmax: votes weighted by exp(cosine / temperature); uniform: one each",
    )
    temperature: float = Field(0.07, gt=0, description="temperature of softmax-weighted votes")


class KNNHead(FeatureHead):
    """Log vote shares of the k most cosine-similar memory features."""

    def __init__(
        self,
        keys: torch.Tensor,
        labels: torch.Tensor,
        k: torch.Tensor | int,
        temperature: torch.Tensor | float,
        num_classes: torch.Tensor | int,
    ) -> None:
        super().__init__(
            keys=F.normalize(torch.as_tensor(keys, dtype=torch.float32), dim=-1),
            labels=torch.as_tensor(labels, dtype=torch.long),
            k=torch.as_tensor(k, dtype=torch.long),
            temperature=torch.as_tensor(temperature, dtype=torch.float32),  # 0: uniform votes
            num_classes=torch.as_tensor(num_classes, dtype=torch.long),
        )

    def vote_shares(self, f: torch.Tensor) -> torch.Tensor:
        """(N, K) fraction of the (weighted) neighbour votes for each class."""
        sims = F.normalize(f.float(), dim=-1) @ self.keys.T
        top = sims.topk(min(int(self.k), len(self.keys)), dim=1)
        if float(self.temperature) > 0:
            w = torch.softmax(top.values / self.temperature, dim=1)
        else:
            w = torch.full_like(top.values, 1.0 / top.values.shape[1])
        votes = torch.zeros(len(f), int(self.num_classes), device=f.device)
        return votes.scatter_add_(1, self.labels[top.indices], w)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.vote_shares(f).clamp_min(EPS).log()


@METHODS.register("knn")
class KNN(FrozenFeatureMethod):
    """Predict the (similarity-weighted) vote shares of the nearest support images."""

    name = "knn"
    changes = "support-feature memory (no training)"
    Options = KNNOptions
    head_type = KNNHead

    def fit_head(
        self,
        model: ImageClassifier,
        support: LabelledFeatures,
        val: LabelledFeatures | None,
        data: ClinicalDataset,
        options: KNNOptions,
        ctx: Context,
    ) -> tuple[KNNHead, dict[str, Any]]:
        k = min(options.k, len(support.x))
        t = options.temperature if options.weighting == "softmax" else 0.0
        head = KNNHead(
            torch.from_numpy(support.x), torch.from_numpy(support.y), k, t, data.num_classes
        )
        return head, {"k": k, "weighting": options.weighting}
