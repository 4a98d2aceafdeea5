"""Clinical metrics computed from labels and predicted probabilities.

Everything is written out from its definition (and checked against scikit-learn in the tests), so
the numbers do not depend on a library's defaults. Undefined values (AUROC with one class
present) are NaN, never a made-up number.
"""

from __future__ import annotations

import math

import numpy as np

from clinadapt.errors import DataError

# Sensitivity and specificity at the fixed threshold 0.5, named so: the headline ``sensitivity``
# and ``specificity`` are at the operating point chosen on validation (see ``evaluate``).
AT_HALF = {"sensitivity": "sensitivity_at_0.5", "specificity": "specificity_at_0.5"}
ECE_BINS = 15  # Guo et al. (2017); the reliability diagrams use the same bins


def _check(labels: np.ndarray, probs: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise DataError(f"probabilities must be (N, K), got {probs.shape}")
    if len(labels) != len(probs):
        raise DataError(f"{len(labels)} labels for {len(probs)} predictions")
    if len(labels) == 0:
        raise DataError("cannot compute metrics on zero predictions")
    if not np.isfinite(probs).all():
        raise DataError("predicted probabilities contain NaN or inf")
    if task != "multilabel" and not np.allclose(probs.sum(1), 1.0, atol=1e-4):
        raise DataError("single-label probabilities must sum to 1 per row")
    return labels, probs


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Fraction of top-1 predictions that are right."""
    return float(np.mean(np.argmax(probs, 1) == labels))


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``labels``."""
    pred = np.argmax(probs, 1)
    recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls))


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in ``labels`` or predicted.

    As scikit-learn's ``f1_score(average="macro")``: a class neither present nor predicted
    (common under prevalence shift) is left out rather than scored 0; a predicted class that is
    absent scores 0.
    """
    pred = np.argmax(probs, 1)
    f1s = []
    for c in np.union1d(np.unique(labels), np.unique(pred)):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(xs)] - 1
    ranks = np.empty(len(x))
    ranks[order] = ((first + last) / 2.0 + 1.0)[np.cumsum(starts) - 1]
    return ranks


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count one half)."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = average_ranks(np.asarray(score, dtype=np.float64))
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(labels: np.ndarray, probs: np.ndarray, task: str = "multiclass") -> float:
    """Binary AUROC of the positive class; one-vs-rest macro for multi-class and multi-label.

    Classes absent from ``labels`` (or always present) are left out of the macro mean.
    """
    if task == "binary" or (task != "multilabel" and probs.shape[1] == 2):
        return binary_auroc(labels == 1, probs[:, 1])
    if task == "multilabel":
        per = [binary_auroc(labels[:, c], probs[:, c]) for c in range(probs.shape[1])]
    else:
        per = [binary_auroc(labels == c, probs[:, c]) for c in range(probs.shape[1])]
    per = [a for a in per if not math.isnan(a)]
    return float(np.mean(per)) if per else math.nan


def confidence_bins(conf: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """The equal-width bin of each confidence: bin i holds (i/n, (i+1)/n], the first also 0.

    A confidence above 1 (rounding) gets ``n_bins``, outside every bin.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.maximum(np.searchsorted(edges, conf, side="left") - 1, 0)


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al., 2017; 15 bins)."""
    conf = probs.max(1)
    correct = (np.argmax(probs, 1) == labels).astype(np.float64)
    bins = confidence_bins(conf, n_bins)
    inside = bins < n_bins
    gap = np.bincount(bins[inside], (correct - conf)[inside], minlength=n_bins)
    return float(np.abs(gap).sum() / len(conf))


def reliability_bins(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (for diagrams)."""
    conf = probs.max(1)
    correct = (np.argmax(probs, 1) == labels).astype(np.float64)
    idx = np.minimum(confidence_bins(conf, n_bins), n_bins - 1)  # the ECE's bins
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / count
        acc = np.bincount(idx, correct, n_bins) / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "confidence": mean_conf,
        "accuracy": acc,
        "count": count,
    }


def nll(
    labels: np.ndarray, probs: np.ndarray, task: str = "multiclass", eps: float = 1e-12
) -> float:
    """Mean negative log-likelihood (binary cross-entropy per label for multi-label)."""
    p = np.clip(probs, eps, 1.0)
    if task == "multilabel":
        q = np.clip(1.0 - probs, eps, 1.0)
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(q)))
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def brier(labels: np.ndarray, probs: np.ndarray, task: str = "multiclass") -> float:
    """Mean squared error between probabilities and one-hot targets, summed over classes."""
    onehot = labels if task == "multilabel" else np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def sensitivity_specificity(
    y: np.ndarray, score: np.ndarray, threshold: float = 0.5
) -> tuple[float, float]:
    """Sensitivity (recall of positives) and specificity at ``score >= threshold``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(score) >= threshold
    sens = float(np.mean(pred[y])) if y.any() else math.nan
    spec = float(np.mean(~pred[~y])) if (~y).any() else math.nan
    return sens, spec


def threshold_for_sensitivity(y: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (``score >= t``) reaches ``target``.

    Choose it on validation data, then apply it unchanged to each test set.
    """
    if not 0.0 < target <= 1.0:
        raise DataError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y).astype(bool)
    pos = np.sort(np.asarray(score, dtype=np.float64)[y])[::-1]
    if len(pos) == 0:
        raise DataError("cannot choose a threshold for a sensitivity without positive examples")
    k = math.ceil(target * len(pos) - 1e-9)  # positives that must score at or above t
    return float(pos[k - 1])


def operating_point(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV and NPV of the rule ``score >= threshold``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(score) >= threshold
    tp, fp = np.sum(pred & y), np.sum(pred & ~y)
    fn, tn = np.sum(~pred & y), np.sum(~pred & ~y)

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else math.nan

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def check_predictions(
    labels: np.ndarray, probs: np.ndarray, task: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels against (N, K) probabilities; return them as arrays."""
    return _check(labels, probs, task)


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, task: str = "multiclass"
) -> dict[str, float]:
    """Every headline metric for one set of predictions."""
    labels, probs = _check(labels, probs, task)
    out: dict[str, float] = {"n": float(len(labels))}
    if task == "multilabel":
        pred = (probs >= 0.5).astype(int)
        out["accuracy"] = float(np.mean(pred == labels))  # per-label accuracy
        out["auroc"] = auroc(labels, probs, task)
        out["nll"] = nll(labels, probs, task)
        out["brier"] = brier(labels, probs, task)
        return out
    out["accuracy"] = accuracy(labels, probs)
    out["balanced_accuracy"] = balanced_accuracy(labels, probs)
    out["macro_f1"] = macro_f1(labels, probs)
    out["auroc"] = auroc(labels, probs, task)
    out["ece"] = expected_calibration_error(labels, probs)
    out["nll"] = nll(labels, probs, task)
    out["brier"] = brier(labels, probs, task)
    if probs.shape[1] == 2:  # the headline values are at the operating point (evaluate)
        sens, spec = sensitivity_specificity(labels == 1, probs[:, 1], 0.5)
        out[AT_HALF["sensitivity"]], out[AT_HALF["specificity"]] = sens, spec
    return out


def metric_names(task: str, num_classes: int) -> list[str]:
    """The names :func:`compute_metrics` returns for ``task`` with ``num_classes`` classes."""
    k = max(int(num_classes), 1)
    if task == "multilabel":
        labels = np.vstack([np.eye(k, dtype=np.int64), np.zeros((1, k), np.int64)])
        probs = np.full(labels.shape, 0.5)
    else:
        labels = np.arange(max(k, 2)) % k
        probs = np.full((len(labels), k), 1.0 / k)
    return [m for m in compute_metrics(labels, probs, task) if m != "n"]
