"""Everything measured on one test set: headline metrics, subgroups, CIs, selective prediction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from clinadapt.errors import ConfigError
from clinadapt.evaluation.bootstrap import bootstrap_ci
from clinadapt.evaluation.metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    check_predictions,
    compute_metrics,
    operating_point,
    threshold_for_sensitivity,
)
from clinadapt.evaluation.selective import aurc, coverage_at_risk
from clinadapt.evaluation.subgroups import SUBGROUP_KEYS, subgroup_metrics

CI_METRICS = ("accuracy", "balanced_accuracy", "auroc")
_FNS = {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy}


def headline(
    labels: np.ndarray, probs: np.ndarray, task: str, names: Sequence[str] = CI_METRICS
) -> dict[str, float]:
    """A few metrics, cheap enough to recompute on every bootstrap replicate or subgroup."""
    out: dict[str, float] = {}
    for name in names:
        if name == "auroc":
            out[name] = auroc(labels, probs, task)
        elif task == "multilabel" and name == "accuracy":
            out[name] = float(np.mean((probs >= 0.5) == labels))
        elif task != "multilabel" and name in _FNS:
            out[name] = _FNS[name](labels, probs)
        elif name not in _FNS:
            raise ConfigError(f"unknown metric {name!r}; choose from {sorted([*_FNS, 'auroc'])}")
    return out


def evaluate(
    labels: np.ndarray,
    probs: np.ndarray,
    task: str = "multiclass",
    metadata: Mapping[str, np.ndarray] | None = None,
    *,
    subgroup_keys: Sequence[str] = SUBGROUP_KEYS,
    ci_metrics: Sequence[str] = CI_METRICS,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    target_error: float = 0.1,
    threshold: float | None = None,
    target_sensitivity: float = 0.9,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Evaluate one test set.

    Returns ``metrics`` (flat headline metrics), ``subgroups`` (per metadata key: groups, worst,
    gap), ``ci`` (percentile bootstrap, by patient when ``metadata`` has ``patient_id``;
    ``n_boot=0`` skips it), ``selective`` (AURC and the coverage at ``target_error``) and,
    for binary tasks, ``operating_point``: at ``threshold``, or else at the threshold that
    reaches ``target_sensitivity`` on ``val`` = (labels, probs), or else at 0.5. The headline
    ``metrics.sensitivity``/``specificity`` are those of the operating point; the values at 0.5
    are ``sensitivity_at_0.5``/``specificity_at_0.5``.
    """
    labels, probs = check_predictions(labels, probs, task)
    metadata = dict(metadata or {})
    for key, values in metadata.items():
        if len(values) != len(labels):
            raise ConfigError(f"metadata {key!r} has {len(values)} values for {len(labels)} labels")
    stat = partial(headline, task=task, names=ci_metrics)
    out: dict[str, Any] = {"metrics": compute_metrics(labels, probs, task)}
    out["subgroups"] = subgroup_metrics(labels, probs, metadata, stat, subgroup_keys)
    if n_boot:
        groups = metadata.get("patient_id")
        out["ci"] = {
            "alpha": alpha,
            "unit": "patient" if groups is not None else "image",
            **bootstrap_ci(labels, probs, stat, n_boot, alpha, seed, groups),
        }
    if task != "multilabel":
        out["selective"] = {
            "aurc": aurc(labels, probs),
            "target_error": target_error,
            "coverage_at_target": coverage_at_risk(labels, probs, target_error),
        }
    op = binary_operating_point(labels, probs, task, threshold, target_sensitivity, val)
    if op is not None:
        out["metrics"].update(sensitivity=op["sensitivity"], specificity=op["specificity"])
        out["operating_point"] = op
    return out


def binary_operating_point(
    labels: np.ndarray,
    probs: np.ndarray,
    task: str,
    threshold: float | None = None,
    target_sensitivity: float = 0.9,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """Sensitivity, specificity, PPV and NPV at the operating point (None unless binary).

    The threshold is ``threshold`` when given, else the one that reaches
    ``target_sensitivity`` on ``val`` = (labels, probs), else 0.5; ``chosen_on`` says which.
    """
    if not (task == "binary" or (task != "multilabel" and probs.shape[1] == 2)):
        return None
    chosen_on = "given"
    if threshold is None and val is not None:
        threshold = threshold_for_sensitivity(
            np.asarray(val[0]) == 1, np.asarray(val[1])[:, 1], target_sensitivity
        )
        chosen_on = f"validation (sensitivity >= {target_sensitivity})"
    elif threshold is None:
        threshold, chosen_on = 0.5, "default"
    return {"chosen_on": chosen_on, **operating_point(labels == 1, probs[:, 1], threshold)}


def metrics_at_operating_point(
    labels: np.ndarray,
    probs: np.ndarray,
    task: str,
    *,
    threshold: float | None = None,
    target_sensitivity: float = 0.9,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """The headline metrics of ``evaluate`` alone (no subgroups, CIs or selective prediction)."""
    metrics = compute_metrics(labels, probs, task)
    op = binary_operating_point(labels, probs, task, threshold, target_sensitivity, val)
    if op is not None:
        metrics.update(sensitivity=op["sensitivity"], specificity=op["specificity"])
    return metrics
