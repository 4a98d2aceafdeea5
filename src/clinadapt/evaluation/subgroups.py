"""Metrics per patient subgroup (site, scanner, sex, age group): each group, the worst, the gap."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from clinadapt.evaluation.metric_info import metric_info

SUBGROUP_KEYS = ("domain", "scanner", "sex", "age_group")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (``hd95/lesion`` as ``hd95``)."""
    return not metric_info(metric).higher_is_better


def subgroup_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    metadata: Mapping[str, np.ndarray],
    statistic: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    keys: Sequence[str] = SUBGROUP_KEYS,
    min_size: int = 1,
) -> dict[str, dict]:
    """Per metadata key with two or more groups: metrics per group, the worst group and the gap.

    ``gap`` is best minus worst group (always >= 0); groups smaller than ``min_size`` are
    reported but left out of worst and gap. NaN metrics never count as worst.
    """
    out: dict[str, dict] = {}
    for key in keys:
        if key not in metadata:
            continue
        values = np.asarray(metadata[key]).astype(str)
        names = sorted(set(values.tolist()))
        if len(names) < 2:
            continue
        groups = {}
        for g in names:
            m = values == g
            groups[g] = {"n": int(m.sum()), **statistic(labels[m], probs[m])}
        worst, gap = {}, {}
        metrics = [k for k in next(iter(groups.values())) if k != "n"]
        for metric in metrics:
            vals = {
                g: v[metric]
                for g, v in groups.items()
                if v["n"] >= min_size and v[metric] is not None and not math.isnan(v[metric])
            }
            if not vals:
                continue
            w = metric_info(metric).worst(vals)
            worst[metric] = {"group": w, "value": vals[w]}
            gap[metric] = float(max(vals.values()) - min(vals.values()))
        out[key] = {"groups": groups, "worst": worst, "gap": gap}
    return out
