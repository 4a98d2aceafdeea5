"""Every headline metric on many weighted copies of one test set at once.

A bootstrap resample is a row of multiplicities (how often each image was drawn), a subgroup is a
row of 0/1: either way, each metric of ``metrics.py`` is a function of weighted sums of per-image
quantities. ``replicate_metrics`` evaluates all rows together with matrix products, ranking the
scores (AUROC) and ordering the confidences (selective prediction) once instead of per row. With
integer weights a row gives the same value as the metric on the data with each image repeated
that many times (the tests check it against ``metrics.py``, ``selective.py`` and scikit-learn).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.metrics import AT_HALF, confidence_bins, metric_names

SINGLE_LABEL = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auroc",
    "ece",
    "nll",
    "brier",
)
# binary tasks: at the operating point (``threshold``) and, named so, at 0.5
AT_THRESHOLD = ("sensitivity", "specificity", "ppv", "npv")
BINARY_EXTRA = (*AT_THRESHOLD, *AT_HALF.values())
SELECTIVE = ("aurc", "coverage_at_target")
MULTILABEL = ("accuracy", "auroc", "nll", "brier")


def is_binary(task: str, num_classes: int) -> bool:
    """Binary single-label predictions: the task says so, or two classes without multi-label."""
    return task == "binary" or (task != "multilabel" and num_classes == 2)


def headline_names(task: str, num_classes: int, threshold: bool = True) -> tuple[str, ...]:
    """The headline metrics of a task: those of ``compute_metrics`` but the values at 0.5,
    with sensitivity and specificity at the operating point for binary tasks (when a threshold
    is known)."""
    names = [m for m in metric_names(task, num_classes) if m not in AT_HALF.values()]
    if is_binary(task, num_classes) and threshold:
        names += ["sensitivity", "specificity"]
    return tuple(names)


def known_names(task: str, num_classes: int) -> tuple[str, ...]:
    """Every metric ``replicate_metrics`` can compute for this task."""
    if task == "multilabel":
        return MULTILABEL
    extra = BINARY_EXTRA if is_binary(task, num_classes) else ()
    return (*SINGLE_LABEL, *extra, *SELECTIVE)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (a metric undefined on that row)."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean_defined(values: np.ndarray) -> np.ndarray:
    """Row means over the non-NaN columns; NaN for a row with none (no warning)."""
    ok = ~np.isnan(values)
    return _ratio(np.where(ok, values, 0.0).sum(1), ok.sum(1).astype(np.float64))


def _blocks(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position of a sorted array: the first and one past the last position of its
    block of equal values."""
    new = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    first = np.flatnonzero(new)
    ends = np.r_[first[1:], len(sorted_values)]
    block = np.cumsum(new) - 1
    return first[block], ends[block]


def _cumsum0(x: np.ndarray) -> np.ndarray:
    """Cumulative sums over rows with a leading row of zeros: ``out[j]`` sums rows ``< j``."""
    out = np.zeros((len(x) + 1, *x.shape[1:]))
    np.cumsum(x, axis=0, out=out[1:])
    return out


def weighted_auroc(positive: np.ndarray, score: np.ndarray, weights_t: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per column of the (N, B) ``weights_t`` (ties count one half); NaN
    without both classes.

    The scores are sorted once; a positive outranks the negative weight before its block of
    tied scores and ties with the negative weight inside it, read from the cumulative weights
    of the negatives in score order.
    """
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(score, kind="mergesort")
    start, stop = _blocks(np.asarray(score, dtype=np.float64)[order])
    pos = positive[order]
    negatives_before = np.r_[0, np.cumsum(~pos)]  # negatives at sorted positions < j
    j = np.flatnonzero(pos)
    neg = _cumsum0(weights_t[order[~pos]])  # (negatives + 1, B)
    w_pos = weights_t[order[j]]
    below = neg[negatives_before[start[j]]]
    through = neg[negatives_before[stop[j]]]
    u = 0.5 * np.sum(w_pos * (below + through), axis=0)
    return _ratio(u, w_pos.sum(0) * neg[-1])


def _selective(
    conf: np.ndarray, error: np.ndarray, weights_t: np.ndarray, total: np.ndarray, target: float
) -> tuple[np.ndarray, np.ndarray]:
    """AURC and the coverage at ``target`` error per column (``selective.py``'s definitions)."""
    order = np.argsort(-conf, kind="stable")
    _, stop = _blocks(conf[order])
    last = np.unique(stop) - 1  # the last position of each block of tied confidence
    w = weights_t[order]
    kept = np.cumsum(w, axis=0)[last].T  # (B, blocks): weight kept down to each block
    errors = np.cumsum(w * error[order, None], axis=0)[last].T
    risk = _ratio(errors, kept)
    coverage = _ratio(kept, total[:, None])
    widths = np.diff(coverage, axis=1, prepend=0.0)
    present = np.diff(kept, axis=1, prepend=0.0) > 0  # blocks not drawn are not on the curve
    aurc = np.where(present, widths * np.nan_to_num(risk), 0.0).sum(1)
    ok = present & (risk <= target + 1e-12)
    cov_at = np.where(ok, coverage, 0.0).max(1)
    empty = total <= 0
    aurc[empty], cov_at[empty] = np.nan, np.nan
    return aurc, cov_at


def replicate_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray,
    names: Sequence[str] | None = None,
    task: str = "multiclass",
    *,
    threshold: float | None = None,
    target_error: float = 0.1,
    n_bins: int = 15,
) -> dict[str, np.ndarray]:
    """``{metric: (B,) values}``, one value per row of the (B, N) ``weights``.

    ``names`` defaults to the task's headline metrics (``headline_names``). Sensitivity,
    specificity, PPV and NPV are at ``threshold`` (the operating point, fixed beforehand; binary
    tasks); ``sensitivity_at_0.5``/``specificity_at_0.5`` at 0.5; ``aurc`` and
    ``coverage_at_target`` (at ``target_error``) are selective prediction. Undefined values (AUROC
    with one class drawn, a row of zero weight) are NaN.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[None]
    n, k = probs.shape
    if w.ndim != 2 or w.shape[1] != n:
        raise DataError(f"weights must be (B, {n}) for {n} predictions, got {np.shape(weights)}")
    if names is None:
        names = headline_names(task, k, threshold is not None)
    allowed = known_names(task, k)
    unknown = [m for m in names if m not in allowed]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r} for a {task} task; choose from {allowed}")
    if threshold is None and any(m in AT_THRESHOLD for m in names):
        raise ConfigError(
            "sensitivity, specificity, PPV and NPV need the operating-point threshold"
        )
    wt = np.ascontiguousarray(w.T)  # (N, B): each image's weights in one row

    def wsum(x: np.ndarray) -> np.ndarray:
        """Weighted sums of per-image values: (N,) -> (B,), (N, C) -> (B, C)."""
        return (np.asarray(x, dtype=np.float64).T @ wt).T

    def mean(x: np.ndarray) -> np.ndarray:
        return _ratio(wsum(x), total)

    total = wt.sum(0)
    out: dict[str, np.ndarray] = {}
    if task == "multilabel":
        y = labels.astype(np.float64)
        for m in names:
            if m == "accuracy":
                out[m] = mean(np.mean((probs >= 0.5) == labels, 1))
            elif m == "auroc":
                per = [weighted_auroc(labels[:, c] == 1, probs[:, c], wt) for c in range(k)]
                out[m] = _mean_defined(np.stack(per, 1))
            elif m == "nll":
                p, q = np.clip(probs, 1e-12, 1.0), np.clip(1.0 - probs, 1e-12, 1.0)
                out[m] = mean(-np.mean(y * np.log(p) + (1 - y) * np.log(q), 1))
            else:  # brier
                out[m] = mean(np.sum((probs - y) ** 2, 1))
        return out

    pred = np.argmax(probs, 1)
    correct = (pred == labels).astype(np.float64)
    onehot = np.eye(k)[labels]
    if {"balanced_accuracy", "macro_f1"} & set(names):
        support, tp, predicted = (
            wsum(onehot),
            wsum(onehot * correct[:, None]),
            wsum(np.eye(k)[pred]),
        )
    for m in names:
        if m == "accuracy":
            out[m] = mean(correct)
        elif m == "balanced_accuracy":
            out[m] = _mean_defined(_ratio(tp, support))
        elif m == "macro_f1":  # over the classes present or predicted, as metrics.macro_f1
            seen = support + predicted > 0
            f1 = np.where(tp > 0, _ratio(2 * tp, support + predicted), 0.0)
            out[m] = _ratio(np.where(seen, f1, 0.0).sum(1), seen.sum(1).astype(np.float64))
        elif m == "auroc":
            if is_binary(task, k):
                out[m] = weighted_auroc(labels == 1, probs[:, 1], wt)
            else:
                per = [weighted_auroc(labels == c, probs[:, c], wt) for c in range(k)]
                out[m] = _mean_defined(np.stack(per, 1))
        elif m == "ece":
            conf = probs.max(1)
            bins = confidence_bins(conf, n_bins)
            inside = np.flatnonzero(bins < n_bins)
            gap = np.zeros((n, n_bins))  # each image's (correct - confidence), in its bin
            gap[inside, bins[inside]] = (correct - conf)[inside]
            out[m] = _ratio(np.abs(wsum(gap)).sum(1), total)
        elif m == "nll":
            out[m] = mean(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, 1.0)))
        elif m == "brier":
            out[m] = mean(np.sum((probs - onehot) ** 2, 1))
        elif m in SELECTIVE:
            if "aurc" not in out:
                out["aurc"], out["coverage_at_target"] = _selective(
                    probs.max(1), 1.0 - correct, wt, total, target_error
                )
        else:  # operating-point metrics of a binary task
            y = labels == 1
            flag = probs[:, 1] >= (0.5 if m in AT_HALF.values() else threshold)
            tp1, fp1, fn1, tn1 = (wsum(v) for v in (flag & y, flag & ~y, ~flag & y, ~flag & ~y))
            num, den = {
                "sensitivity": (tp1, tp1 + fn1),
                "specificity": (tn1, tn1 + fp1),
                "ppv": (tp1, tp1 + fp1),
                "npv": (tn1, tn1 + fn1),
            }[m.removesuffix("_at_0.5")]
            out[m] = _ratio(num, den)
    return {m: out[m] for m in names}
