"""`linear-probe`: logistic regression on frozen (cached) features, C chosen within the budget.

C is chosen on the labelled data the run may see (``selection``, see
:mod:`clinadapt.methods.budget`): by cross-validation within the support set in K-shot runs
(K >= 2), on a K-shot validation set (``kshot-val``), on the validation split in runs on all
training data, or fixed (1-shot: scikit-learn's default C = 1). Every C of the grid and every
fold are fitted together on the cached features (:mod:`clinadapt.methods.logistic`), and the
head is the whole-support fit at the chosen C, with no refit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import IncompatibleError
from clinadapt.evaluation.metrics import balanced_accuracy
from clinadapt.methods.base import METHODS, Context, FitMethod
from clinadapt.methods.budget import CrossValidatedOptions, n_cv_folds, stratified_folds
from clinadapt.methods.frozen import FrozenFeatureMethod, FrozenOptions, LabelledFeatures
from clinadapt.methods.logistic import logistic_path


class ProbeOptions(FrozenOptions, CrossValidatedOptions):
    c_grid: list[float] = Field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],
        description="inverse L2 strengths tried; the best balanced accuracy wins (on ties, the "
        "smallest C)",
    )
    c: float = Field(
        1.0,
        gt=0,
        description="C when nothing is selected (selection fixed; scikit-learn's default)",
    )
    max_iter: int = Field(200, ge=10, description="Newton (or L-BFGS) iterations per C")


def _scores(fits: list, x: np.ndarray, y: np.ndarray, folds: np.ndarray | None) -> list[float]:
    """Balanced accuracy per C: of the held-out predictions pooled over folds, or on (x, y)."""
    out = []
    for fit in fits:
        if folds is None:
            pred = fit.logits(x, 0).argmax(1)
        else:
            pred = np.empty(len(y), dtype=np.int64)
            for f in range(int(folds.max()) + 1):
                held = folds == f
                pred[held] = fit.logits(x[held], f).argmax(1)
        out.append(balanced_accuracy(y, np.eye(fits[0].weight.shape[2])[pred]))
    return out


@METHODS.register("linear-probe")
class LinearProbe(FrozenFeatureMethod):
    """Fit a multinomial logistic regression on frozen features and make it the linear head."""

    name = "linear-probe"
    Options = ProbeOptions
    cross_validates = True

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
        counts = np.bincount(ytr)
        if (counts > 0).sum() < 2:
            raise IncompatibleError(f"linear-probe: {data.name} holds a single class")
        selection = options.selection
        if selection == "auto":  # called directly: choose as the budget would
            selection = "validation" if val is not None else "support-cv"
            if selection == "support-cv" and counts[counts > 0].min() < 2:
                selection = "fixed"
        if selection in ("validation", "kshot-val") and val is None:
            selection = "fixed"  # no validation data (e.g. a dataset without a val split)
        summary: dict[str, Any] = {"selection": selection}
        grid = sorted(set(options.c_grid)) if selection != "fixed" else [options.c]
        folds = None
        masks = np.ones((1, len(ytr)), bool)
        if selection == "support-cv":
            n_folds = n_cv_folds(ytr, options.cv_folds)
            folds = stratified_folds(ytr, n_folds, ctx.seed)
            masks = np.vstack([folds[None] != np.arange(n_folds)[:, None], masks])
            summary["cv_folds"] = n_folds
        fits = logistic_path(xtr, ytr, data.num_classes, grid, masks, max_iter=options.max_iter)
        best = 0
        if selection == "support-cv":
            scores = _scores(fits, xtr, ytr, folds)
        elif selection != "fixed":
            scores = _scores(fits, val.x, val.y, None)
        if selection != "fixed":
            best = int(np.argmax(scores))  # the first best: the smallest C on ties
            key = "cv_balanced_accuracy_by_C" if folds is not None else "val_balanced_accuracy_by_C"
            summary[key] = {str(c): s for c, s in zip(grid, scores, strict=True)}
        final = fits[best]
        w, b = final.weight[-1].T, final.bias[-1]
        head = nn.Linear(w.shape[1], data.num_classes)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(w))
            head.bias.copy_(torch.as_tensor(b))
        summary.update(C=grid[best], iterations=[f.iterations for f in fits])
        return head, summary

    def load_adapted(self, model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
        FitMethod.load_adapted(self, model, state)  # the head is a plain nn.Linear
