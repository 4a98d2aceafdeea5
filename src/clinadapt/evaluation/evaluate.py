"""Everything measured on one test set: headline metrics, subgroups, CIs, selective prediction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from clinadapt.errors import ConfigError
from clinadapt.evaluation.bootstrap import bootstrap_ci
from clinadapt.evaluation.metrics import (
    check_predictions,
    compute_metrics,
    operating_point,
    threshold_for_sensitivity,
)
from clinadapt.evaluation.replicates import headline_names, replicate_metrics
from clinadapt.evaluation.selective import aurc, coverage_at_risk
from clinadapt.evaluation.subgroups import SUBGROUP_KEYS, subgroup_metrics


def headline(
    labels: np.ndarray,
    probs: np.ndarray,
    task: str,
    names: Sequence[str] | None = None,
    threshold: float | None = None,
) -> dict[str, float]:
    """Metrics by name (default: the task's headline metrics, ``replicates.headline_names``),
    the form subgroups and custom statistics take; ``threshold`` is the operating point."""
    w = np.ones((1, len(labels)))
    reps = replicate_metrics(labels, probs, w, names, task, threshold=threshold)
    return {k: float(v[0]) for k, v in reps.items()}


def evaluate(
    labels: np.ndarray,
    probs: np.ndarray,
    task: str = "multiclass",
    metadata: Mapping[str, np.ndarray] | None = None,
    *,
    subgroup_keys: Sequence[str] = SUBGROUP_KEYS,
    ci_metrics: Sequence[str] | None = None,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    target_error: float = 0.1,
    threshold: float | None = None,
    target_sensitivity: float = 0.9,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Evaluate one test set.

    Returns ``metrics`` (flat headline metrics), ``counts`` (images and distinct patients),
    ``subgroups`` (per metadata key: groups, worst, gap), ``ci`` (percentile bootstrap of
    ``ci_metrics``, default every headline metric, by patient when ``metadata`` has
    ``patient_id``; ``n_boot=0`` skips it), ``selective`` (AURC and the coverage at
    ``target_error``) and, for binary tasks, ``operating_point``: at ``threshold``, or else at
    the threshold that
    reaches ``target_sensitivity`` on ``val`` = (labels, probs), or else at 0.5. The headline
    ``metrics.sensitivity``/``specificity`` are those of the operating point; the values at 0.5
    are ``sensitivity_at_0.5``/``specificity_at_0.5``.
    """
    labels, probs = check_predictions(labels, probs, task)
    metadata = dict(metadata or {})
    for key, values in metadata.items():
        if len(values) != len(labels):
            raise ConfigError(f"metadata {key!r} has {len(values)} values for {len(labels)} labels")
    out: dict[str, Any] = {"metrics": compute_metrics(labels, probs, task)}
    op = binary_operating_point(labels, probs, task, threshold, target_sensitivity, val)
    if op is not None:
        out["metrics"].update(sensitivity=op["sensitivity"], specificity=op["specificity"])
    at = op["threshold"] if op is not None else None
    names = ci_metrics or headline_names(task, probs.shape[1], at is not None)
    stat = partial(headline, task=task, names=names, threshold=at)
    patients = metadata.get("patient_id")
    out["counts"] = {
        "images": len(labels),
        "patients": None if patients is None else len(np.unique(np.asarray(patients))),
    }
    out["subgroups"] = subgroup_metrics(labels, probs, metadata, stat, subgroup_keys)
    if n_boot:
        groups = metadata.get("patient_id")
        out["ci"] = {
            "alpha": alpha,
            "unit": "patient" if groups is not None else "image",
            **bootstrap_ci(
                labels, probs, names, n_boot, alpha, seed, groups, task=task, threshold=at
            ),
        }
    if task != "multilabel":
        out["selective"] = {
            "aurc": aurc(labels, probs),
            "target_error": target_error,
            "coverage_at_target": coverage_at_risk(labels, probs, target_error),
        }
    if op is not None:
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
    ``target_sensitivity`` on ``val`` = (labels, probs), else 0.5; ``chosen_on`` says which,
    and ``note`` why validation data that were given could not set it (no positive example:
    no sensitivity to reach, so the run goes on at 0.5 instead of failing after its training).
    """
    if not (task == "binary" or (task != "multilabel" and probs.shape[1] == 2)):
        return None
    chosen_on, note = "given", None
    positive = np.asarray(val[0]) == 1 if val is not None else None
    if threshold is None and positive is not None and positive.any():
        threshold = threshold_for_sensitivity(
            positive, np.asarray(val[1])[:, 1], target_sensitivity
        )
        chosen_on = f"validation (sensitivity >= {target_sensitivity})"
    elif threshold is None:
        threshold, chosen_on = 0.5, "default"
        if positive is not None:
            note = (
                f"the validation data ({len(positive)} images) hold no positive example, so no "
                f"threshold reaches sensitivity {target_sensitivity} on them; 0.5 is used"
            )
    op = {"chosen_on": chosen_on, **operating_point(labels == 1, probs[:, 1], threshold)}
    return {**op, "note": note} if note else op
