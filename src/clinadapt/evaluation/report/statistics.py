"""Metrics recomputed from stored predictions on weighted copies of a test set.

A record stores each test set's metrics and their bootstrap CI. A report also shows values that
combine several sets or seeds (the mean over corruptions at one severity, the shifted mean, a
subgroup over the shifted sets); their intervals come from resampling the stored predictions.
A resample is a row of weights (how often each image was drawn; 0/1 for a subgroup), and a
:data:`Replicates` function gives the metric for every row at once. Classification uses
:func:`clinadapt.evaluation.replicates.replicate_metrics` (tests check that one row of ones gives
the record's value); a task adds its own with :func:`register`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from clinadapt.evaluation.replicates import AT_THRESHOLD, known_names, replicate_metrics
from clinadapt.evaluation.report.predictions import SetPredictions

# (predictions, (B, n) weights) -> (B,) values, NaN where undefined
Replicates = Callable[[SetPredictions, np.ndarray], np.ndarray]
# (metric, task, record, test set) -> replicates, or None when it cannot be recomputed
Factory = Callable[[str, str, dict[str, Any], str], Replicates | None]

_FACTORIES: dict[str, Factory] = {}


def register(task: str, factory: Factory) -> None:
    """Declare how ``task``'s metrics are recomputed from stored predictions."""
    _FACTORIES[task] = factory


def replicates(metric: str, task: str, record: dict[str, Any], test_set: str) -> Replicates | None:
    """How to recompute ``metric`` of one run's test set; None if the task does not say."""
    factory = _FACTORIES.get(task)
    return None if factory is None else factory(metric, task, record, test_set)


def classification(
    metric: str, task: str, record: dict[str, Any], test_set: str
) -> Replicates | None:
    """Replicates of the classification metrics (``evaluation.replicates``: the definitions of
    ``metrics.py`` and ``selective.py``); sensitivity, specificity, PPV and NPV at the run's
    fixed operating point, coverage at the run's target error."""
    k = len((record.get("data") or {}).get("class_names") or []) or 2
    if metric not in known_names(task, k):
        return None
    op = (record.get("operating_point") or {}).get(test_set) or {}
    sel = (record.get("selective") or {}).get(test_set) or {}
    threshold = op.get("threshold")
    if metric in AT_THRESHOLD and threshold is None:
        return None
    settings = {"threshold": threshold, "target_error": sel.get("target_error", 0.1)}

    def rep(pred: SetPredictions, weights: np.ndarray) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        return replicate_metrics(pred.labels, pred.probs, w, [metric], task, **settings)[metric]

    return rep


for _task in ("multiclass", "binary", "multilabel"):
    register(_task, classification)


def in_group(rep: Replicates, key: str, group: str) -> Replicates:
    """``rep`` on the images whose metadata ``key`` is ``group``."""

    def fn(pred: SetPredictions, weights: np.ndarray) -> np.ndarray:
        if key not in pred.meta:
            return np.full(len(weights), np.nan)
        return rep(pred, weights * (pred.meta[key] == group))

    return fn


def gap(rep: Replicates, key: str) -> Replicates:
    """Best minus worst group of metadata ``key``, over groups where the metric is defined
    (as ``subgroups.subgroup_metrics``); NaN with fewer than two such groups."""

    def fn(pred: SetPredictions, weights: np.ndarray) -> np.ndarray:
        if key not in pred.meta:
            return np.full(len(weights), np.nan)
        per = np.stack([in_group(rep, key, g)(pred, weights) for g in np.unique(pred.meta[key])], 1)
        ok = ~np.isnan(per)
        hi = np.where(ok, per, -np.inf).max(1)
        lo = np.where(ok, per, np.inf).min(1)
        return np.where(ok.sum(1) >= 2, hi - lo, np.nan)

    return fn


def full_value(rep: Replicates, pred: SetPredictions) -> float:
    """The metric on the whole test set (one row of ones)."""
    v = rep(pred, np.ones((1, len(pred))))[0]
    return float(v) if not math.isnan(v) else math.nan
