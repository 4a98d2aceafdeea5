"""The change of a test-time adapted model against its unadapted source, on the same stream."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from clinadapt.evaluation.bootstrap import paired_bootstrap_ci
from clinadapt.evaluation.evaluate import evaluate

log = logging.getLogger("clinadapt.evaluation")

#: metrics whose change is reported (ECE: lower is better, so a positive change is worse)
COMPARED = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
#: metrics whose drop below the source flags a degradation (each with a paired bootstrap CI)
FLAGGED = ("balanced_accuracy", "auroc")


def change_vs_source(
    labels: np.ndarray,
    adapted: np.ndarray,
    source: np.ndarray,
    task: str,
    adapted_metrics: Mapping[str, float],
    source_metrics: Mapping[str, float],
    *,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Per metric ``{source, adapted, change}`` (change = adapted - source); for the
    :data:`FLAGGED` metrics also ``low``/``high``, the percentile CI of the change from paired
    bootstrap resamples (the same images, or patients when ``groups``, for both models)."""
    out = metric_changes(adapted_metrics, source_metrics, COMPARED)
    flagged = [m for m in FLAGGED if m in out]
    if n_boot and flagged:
        ci = paired_bootstrap_ci(
            labels, adapted, source, flagged, n_boot, alpha, seed, groups, task=task
        )
        for m in flagged:
            out[m]["low"], out[m]["high"] = ci[m]["low"], ci[m]["high"]
    return out


def metric_changes(
    adapted_metrics: Mapping[str, float], source_metrics: Mapping[str, float], names: Any
) -> dict[str, dict[str, Any]]:
    """Per metric of ``names`` finite in both: ``{source, adapted, change}`` (adapted - source)."""
    out: dict[str, dict[str, Any]] = {}
    for m in names:
        a, s = adapted_metrics.get(m), source_metrics.get(m)
        if a is None or s is None or not (math.isfinite(a) and math.isfinite(s)):
            continue
        out[m] = {"source": float(s), "adapted": float(a), "change": float(a) - float(s)}
    return out


def degradations(
    vs_source: Mapping[str, Mapping[str, Mapping[str, Any]]],
    flagged: tuple[str, ...] = FLAGGED,
) -> list[dict[str, Any]]:
    """Every (test set, flagged metric) where the adapted model ends below its source;
    ``significant`` when the whole CI of the change lies below 0."""
    out = []
    for name, per_metric in vs_source.items():
        for m in flagged:
            c = per_metric.get(m)
            if c is None or c["change"] >= 0:
                continue
            high = c.get("high")
            out.append(
                {
                    "set": name,
                    "metric": m,
                    **c,
                    "significant": bool(high is not None and high < 0),
                }
            )
    return out


def describe(method: str, d: Mapping[str, Any]) -> str:
    """One line for a degradation, e.g. for the log and the record's warnings."""
    ci = f", CI {d['low']:+.3f} to {d['high']:+.3f}" if "low" in d else ""
    return (
        f"{method} on {d['set']}: {d['metric']} {d['adapted']:.3f} below the unadapted "
        f"source's {d['source']:.3f} (change {d['change']:+.3f}{ci})"
    )


def against_source(
    method: str,
    task: str,
    labels: Mapping[str, np.ndarray],
    probs: Mapping[str, np.ndarray],
    source_probs: Mapping[str, np.ndarray],
    metrics: Mapping[str, Mapping[str, float]],
    meta: Mapping[str, Mapping[str, np.ndarray]],
    val: tuple[np.ndarray, np.ndarray] | None,
    settings: Mapping[str, Any],
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per test set the unadapted source predicted (``source_probs``, same images, same order):
    ``source_metrics``, ``vs_source`` and ``degraded``; one warning line when any set degraded.

    ``settings`` are the evaluation settings of the adapted model's own evaluation (the source is
    evaluated alike, at the same operating point ``val``, without its own bootstrap: the CI that
    matters is the paired one of the change).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, p in source_probs.items():
        m = meta.get(name) or {}
        src = evaluate(labels[name], p, task, m, seed=seed, val=val, **{**settings, "n_boot": 0})
        vs = change_vs_source(
            labels[name],
            probs[name],
            p,
            task,
            metrics[name],
            src["metrics"],
            n_boot=settings.get("n_boot", 0),
            alpha=settings.get("alpha", 0.05),
            seed=seed,
            groups=m.get("patient_id"),
        )
        out[name] = {
            "source_metrics": src["metrics"],
            "vs_source": vs,
            "degraded": degradations({name: vs}),
        }
    degraded = [d for parts in out.values() for d in parts["degraded"]]
    if degraded:  # one line per run; every case is in the record
        log.warning(
            "%s ended below the unadapted source on %d of %d test sets (%d with the whole CI "
            "below 0; record['degraded']); the largest drop: %s",
            method,
            len({d["set"] for d in degraded}),
            len(out),
            sum(d["significant"] for d in degraded),
            describe(method, min(degraded, key=lambda d: d["change"])),
        )
    return out
