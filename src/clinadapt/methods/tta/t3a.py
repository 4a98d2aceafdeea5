"""`t3a`: test-time template adjustment (Iwasawa and Matsuo, "Test-Time Classifier Adjustment
Module for Model-Agnostic Domain Generalization", NeurIPS 2021).

Training-free: the linear head is replaced by class prototypes. The supports start as the head's
weight vectors (labelled by what the head predicts for them); every test feature joins the supports
under its pseudo-label with its prediction entropy, and only the M lowest-entropy supports of each
class are kept. A prototype is the normalised sum of its class's normalised supports, and logits
are ``features @ prototypes.T``. State: the supports; the model itself never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.errors import IncompatibleError
from clinadapt.methods.base import METHODS, Context
from clinadapt.methods.tta.adapter import (
    Adapter,
    GuardOptions,
    Step,
    StreamMethod,
    softmax_entropy,
)


class T3AOptions(GuardOptions):
    # The paper fixes no filter_K: the authors sweep [1, 5, 20, 50, 100, -1] and select on
    # held-out source data (matsuolab/T3A, domainbed/scripts/unsupervised_adaptation.py); 100
    # here is one of the swept values. Pick M on source validation data for a new dataset.
    filter_k: int = Field(
        100, ge=-1, description="supports kept per class, M (-1: all; the authors sweep M)"
    )


def select_supports(
    supports: torch.Tensor, labels: torch.Tensor, entropy: torch.Tensor, m: int
) -> torch.Tensor:
    """Indices of the ``m`` lowest-entropy supports of each class (all when m = -1).

    m = -1 keeps every support, as the paper means by it. The authors' code
    (``domainbed/adapt_algorithms.py``, ``T3A.select_supports``) sets the keep-all indices for
    -1 but then overwrites them with the per-class ``[:filter_K]`` slice, which with -1 drops
    the highest-entropy support of each class at every step; that is not followed here.
    """
    if m < 0:
        return torch.arange(len(supports), device=supports.device)
    cls = labels.argmax(1)
    keep = []
    for k in range(labels.shape[1]):
        idx = torch.nonzero(cls == k).flatten()
        keep.append(idx[torch.argsort(entropy[idx], stable=True)][:m])
    return torch.sort(torch.cat(keep)).values


def prototypes(supports: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K, D) normalised prototypes: the normalised sum of each class's normalised supports."""
    return F.normalize(labels.T.float() @ F.normalize(supports, dim=1), dim=1)


class T3AAdapter(Adapter):
    """T3A: keep entropy-filtered supports per class and classify by prototype similarity."""

    def __init__(self, model: ImageClassifier, filter_k: int) -> None:
        super().__init__(model, None)
        head = model.head
        if not isinstance(head, nn.Linear):
            raise IncompatibleError(
                f"t3a needs a linear head to start its prototypes from; got {type(head).__name__}"
            )
        self.filter_k = filter_k
        with torch.no_grad():
            w = head.weight.detach().clone()
            logits = head(w)
        k = head.out_features
        self.warmup = (w, F.one_hot(logits.argmax(1), k).float(), softmax_entropy(logits))
        self.on_reset()

    def on_reset(self) -> None:
        self.supports, self.labels, self.entropy = (t.clone() for t in self.warmup)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        z = self.model.features(x)
        p = self.model.head(z)
        self.supports = torch.cat([self.supports, z])
        self.labels = torch.cat([self.labels, F.one_hot(p.argmax(1), p.shape[1]).float()])
        self.entropy = torch.cat([self.entropy, softmax_entropy(p)])
        keep = select_supports(self.supports, self.labels, self.entropy, self.filter_k)
        self.supports, self.labels, self.entropy = (
            self.supports[keep],
            self.labels[keep],
            self.entropy[keep],
        )
        return Step(z @ prototypes(self.supports, self.labels).T)


@METHODS.register("t3a")
class T3A(StreamMethod):
    """Replace the head by prototypes that follow the test stream; no gradient."""

    name = "t3a"
    changes = "classifier prototypes (from test features)"
    default_target = "none"
    Options = T3AOptions

    def build(
        self, model: ImageClassifier, num_classes: int, options: T3AOptions, ctx: Context
    ) -> T3AAdapter:
        model.eval()
        return T3AAdapter(model, options.filter_k)
