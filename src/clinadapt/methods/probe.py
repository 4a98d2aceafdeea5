"""`linear-probe`: logistic regression on frozen (cached) features, C chosen on validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from sklearn.linear_model import LogisticRegression
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import IncompatibleError
from clinadapt.evaluation.metrics import balanced_accuracy
from clinadapt.methods.base import METHODS, Context, FitMethod
from clinadapt.methods.frozen import FrozenFeatureMethod, FrozenOptions, LabelledFeatures


class ProbeOptions(FrozenOptions):
    c_grid: list[float] = Field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],
        description="inverse L2 strengths tried; the best on validation balanced accuracy is kept",
    )
    max_iter: int = Field(2000, ge=10, description="L-BFGS iterations")


def head_from_logistic(clf: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) weights and (K,) bias whose softmax equals ``clf.predict_proba``.

    For two classes scikit-learn keeps one row w: softmax([0, w.x + b]) = sigmoid(w.x + b).
    """
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    w = np.zeros((num_classes, coef.shape[1]))
    b = np.full(num_classes, -1e4)  # classes absent from training can never be predicted
    w[clf.classes_] = coef
    b[clf.classes_] = intercept
    return w, b


@METHODS.register("linear-probe")
class LinearProbe(FrozenFeatureMethod):
    """Fit a multinomial logistic regression on frozen features and make it the linear head."""

    name = "linear-probe"
    Options = ProbeOptions

    def fit_head(
        self,
        model: ImageClassifier,
        support: LabelledFeatures,
        val: LabelledFeatures | None,
        data: ClinicalDataset,
        options: ProbeOptions,
        ctx: Context,
    ) -> tuple[nn.Linear, dict[str, Any]]:
        xtr, ytr = support.x, support.y
        if len(np.unique(ytr)) < 2:
            raise IncompatibleError(f"linear-probe: {data.name} holds a single class")
        scores: dict[float, float] = {}
        best_c, best = options.c_grid[0], -np.inf
        if val is not None and len(options.c_grid) > 1:
            for c in options.c_grid:
                lr = LogisticRegression(C=c, max_iter=options.max_iter).fit(xtr, ytr)
                scores[c] = s = balanced_accuracy(val.y, _full_proba(lr, val.x, data.num_classes))
                if s > best:
                    best, best_c = s, c
        lr = LogisticRegression(C=best_c, max_iter=options.max_iter).fit(xtr, ytr)
        w, b = head_from_logistic(lr, data.num_classes)
        head = nn.Linear(w.shape[1], data.num_classes)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(w))
            head.bias.copy_(torch.as_tensor(b))
        summary = {
            "C": best_c,
            "val_balanced_accuracy_by_C": {str(k): v for k, v in scores.items()},
        }
        return head, summary

    def load_adapted(self, model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
        FitMethod.load_adapted(self, model, state)  # the head is a plain nn.Linear


def _full_proba(lr: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    p = np.zeros((len(x), num_classes))
    p[:, lr.classes_] = lr.predict_proba(x)
    return p
