"""Judge a pre-trained backbone by frozen features: a linear probe and a k-nearest-neighbour vote."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import DataError
from clinadapt.evaluation.metrics import balanced_accuracy
from clinadapt.models.base import FoundationModel
from clinadapt.progress import progress

C_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)
# DINO's k-NN evaluation: 20 neighbours, votes weighted by exp(cosine / 0.07).
KNN_K = 20
KNN_T = 0.07


@torch.no_grad()
def embed(model: FoundationModel, ds: ClinicalDataset, batch_size: int = 128) -> np.ndarray:
    """Frozen (N, D) features of ``ds`` (model in eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = -(-len(ds) // batch_size)
    feats = [
        model.encode_image(x).float().cpu()
        for x, _, _ in progress(
            ds.batches(model.preprocess, batch_size, device=device), "embed", total=total
        )
    ]
    model.train(was_training)
    return torch.cat(feats).numpy()


def _proba(clf: LogisticRegression, x: np.ndarray, k: int) -> np.ndarray:
    p = np.zeros((len(x), k))
    p[:, clf.classes_] = clf.predict_proba(x)
    return p


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def linear_probe(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xva: np.ndarray,
    yva: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    num_classes: int,
    c_grid: tuple[float, ...] = C_GRID,
) -> dict[str, Any]:
    """Logistic regression on standardised features; C chosen by validation balanced accuracy."""
    xtr, xva, xte = _standardise(xtr, xva, xte)
    best_c, best = c_grid[0], -np.inf
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
        score = balanced_accuracy(yva, _proba(clf, xva, num_classes))
        if score > best:
            best, best_c = score, c
    clf = LogisticRegression(C=best_c, max_iter=2000).fit(xtr, ytr)
    p = _proba(clf, xte, num_classes)
    return {
        "balanced_accuracy": float(balanced_accuracy(yte, p)),
        "accuracy": float((p.argmax(1) == yte).mean()),
        "C": best_c,
        "val_balanced_accuracy": float(best),
    }


def knn_predict_proba(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    num_classes: int,
    k: int = KNN_K,
    t: float = KNN_T,
) -> np.ndarray:
    """Class scores of a cosine k-NN whose neighbours vote with weight ``exp(sim / t)``."""
    a = F.normalize(torch.as_tensor(xtr, dtype=torch.float64), dim=1)
    b = F.normalize(torch.as_tensor(xte, dtype=torch.float64), dim=1)
    k = min(k, len(a))
    sim, idx = (b @ a.T).topk(k, dim=1)
    w = torch.exp(sim / t)
    labels = torch.as_tensor(ytr, dtype=torch.long)[idx]
    votes = torch.zeros(len(b), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, labels, w)
    return (votes / votes.sum(1, keepdim=True)).numpy()


EVAL_SPLITS = ("train", "val", "test")


def eval_positions(ds: ClinicalDataset, seed: int = 0) -> dict[str, np.ndarray]:
    """Positions in ``ds`` of the probe's train, val and test parts.

    The ``split`` metadata when it has all three, else a seeded 60/20/20 split stratified by
    label. Pre-training takes its default pool from the same parts (train and val), so the
    probe's test images are never pre-trained on unless the run says ``transductive``.
    """
    if set(EVAL_SPLITS) <= set(ds.splits):
        split = ds.meta("split")
        return {name: np.flatnonzero(split == name) for name in EVAL_SPLITS}
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(ds.labels):
        pos = rng.permutation(np.flatnonzero(ds.labels == c))
        a, b = round(0.6 * len(pos)), round(0.8 * len(pos))
        for part, chunk in zip(parts, (pos[:a], pos[a:b], pos[b:]), strict=True):
            part.extend(chunk.tolist())
    if not all(parts):
        raise DataError(f"{ds.name}: too few labelled images for a train/val/test evaluation")
    return {name: np.sort(np.array(p)) for name, p in zip(EVAL_SPLITS, parts, strict=True)}


def split_for_eval(ds: ClinicalDataset, seed: int = 0) -> tuple[ClinicalDataset, ...]:
    """(train, val, test) from the ``split`` metadata, else a seeded 60/20/20 stratified split."""
    pos = eval_positions(ds, seed)
    return tuple(ds.subset(pos[n], name=f"{ds.name}/{n}") for n in EVAL_SPLITS)


def evaluate_backbone(
    model: FoundationModel,
    ds: ClinicalDataset,
    seed: int = 0,
    batch_size: int = 128,
    pretrained_on: ClinicalDataset | None = None,
) -> dict[str, Any]:
    """Linear-probe and k-NN balanced accuracy on the test split, from frozen features.

    ``evaluated_on`` says which split the numbers come from and, given the pre-training pool
    ``pretrained_on``, how many of its images the backbone saw (unlabelled) while training.
    """
    if ds.task in ("multilabel", "segmentation"):
        raise DataError(
            f"{ds.name}: the probe evaluation handles single-label classification only, not "
            f"{ds.task}; pre-train without it (evaluate=false)"
        )
    train, val, test = split_for_eval(ds, seed)
    xtr, xva, xte = (embed(model, d, batch_size) for d in (train, val, test))
    k = ds.num_classes
    probe = linear_probe(xtr, train.labels, xva, val.labels, xte, test.labels, k)
    p = knn_predict_proba(xtr, train.labels, xte, k)
    knn = {
        "balanced_accuracy": float(balanced_accuracy(test.labels, p)),
        "accuracy": float((p.argmax(1) == test.labels).mean()),
        "k": min(KNN_K, len(xtr)),
        "temperature": KNN_T,
    }
    evaluated_on: dict[str, Any] = {
        "split": "test",
        "images": len(test),
        "from": "split metadata" if set(EVAL_SPLITS) <= set(ds.splits) else "seeded 60/20/20",
    }
    if pretrained_on is not None:
        seen = int(np.isin(test.index, pretrained_on.index).sum())
        evaluated_on["pretrained_on_test_images"] = seen
    return {
        "linear_probe": probe,
        "knn": knn,
        "images": {"train": len(train), "val": len(val), "test": len(test)},
        "evaluated_on": evaluated_on,
    }
