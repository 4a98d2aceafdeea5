"""Everything measured on one segmentation test set: headline metrics, sizes, subgroups, CIs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clinadapt.errors import ConfigError
from clinadapt.evaluation.bootstrap import bootstrap_ci
from clinadapt.evaluation.seg_metrics import SIZE_EDGES_MM, SegTable, size_bins, summarise_table
from clinadapt.evaluation.subgroups import SUBGROUP_KEYS, subgroup_metrics

# The metrics that get bootstrap CIs and per-subgroup values (cheap to recompute per resample).
SEG_CI_METRICS = ("dice", "dice_present", "nsd", "hd95")


def table_statistic(table: SegTable, names: Sequence[str] = SEG_CI_METRICS):
    """A statistic over row positions of ``table``, in the form bootstrap and subgroups take.

    Rows are passed as the first argument (``labels``); the second is ignored. A resample that
    draws an image twice counts it twice.
    """
    unknown = [n for n in names if n not in summarise_table(table.take(np.arange(1)))]
    if unknown:
        raise ConfigError(f"unknown segmentation metric(s) {unknown}")

    def stat(rows: np.ndarray, _unused: np.ndarray) -> dict[str, float]:
        s = summarise_table(table.take(np.asarray(rows, dtype=np.int64)))
        return {n: s[n] for n in names}

    return stat


def evaluate_segmentation(
    table: SegTable,
    metadata: Mapping[str, np.ndarray] | None = None,
    *,
    subgroup_keys: Sequence[str] = SUBGROUP_KEYS,
    ci_metrics: Sequence[str] = SEG_CI_METRICS,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    size_edges_mm: Sequence[float] = SIZE_EDGES_MM,
    nsd_tolerance_mm: float | None = None,
) -> dict[str, Any]:
    """Evaluate one segmentation test set from its per-image :class:`SegTable`.

    Returns ``metrics`` (see :func:`summarise_table`), ``size_bins`` (per class and reference
    size), ``subgroups`` (per metadata key, e.g. domain: each group, the worst, the gap), ``ci``
    (percentile bootstrap over patients when ``metadata`` has ``patient_id``, else images;
    ``n_boot=0`` skips it) and ``warnings`` (e.g. an NSD tolerance finer than the pixels).
    """
    n = len(table)
    metadata = dict(metadata or {})
    for key, values in metadata.items():
        if len(values) != n:
            raise ConfigError(f"metadata {key!r} has {len(values)} values for {n} images")
    rows = np.arange(n)
    stat = table_statistic(table, ci_metrics)
    out: dict[str, Any] = {
        "metrics": summarise_table(table),
        "size_bins": size_bins(table, size_edges_mm),
        "subgroups": subgroup_metrics(rows, rows, metadata, stat, subgroup_keys),
    }
    if n_boot:
        groups = metadata.get("patient_id")
        out["ci"] = {
            "alpha": alpha,
            "unit": "patient" if groups is not None else "image",
            **bootstrap_ci(rows, rows, stat, n_boot, alpha, seed, groups),
        }
    warn = []
    if nsd_tolerance_mm is not None and nsd_tolerance_mm < table.spacing.min():
        warn.append(
            f"the NSD tolerance {nsd_tolerance_mm:g} mm is finer than the pixels "
            f"({table.spacing.min():g} mm): NSD only counts boundary pixels that coincide"
        )
    if warn:
        out["warnings"] = warn
    return out


# compared against the unadapted source; a drop in the flagged ones is a degradation
SEG_COMPARED = ("dice", "dice_present", "nsd", "hd95")
SEG_FLAGGED = ("dice_present", "dice")


def against_source(
    test_set: str,
    adapted: SegTable,
    source: SegTable,
    metadata: Mapping[str, np.ndarray] | None = None,
    *,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """A test-time adapted model against its unadapted source on the same images:
    ``source_metrics``, ``vs_source`` (per metric source, adapted, change; for the flagged ones
    the percentile CI of the change from paired bootstrap resamples of patients, or images) and
    ``degraded`` (the flagged metrics that ended below the source)."""
    from clinadapt.evaluation.compare import degradations, metric_changes

    src = summarise_table(source)
    vs = metric_changes(summarise_table(adapted), src, SEG_COMPARED)
    flagged = [m for m in SEG_FLAGGED if m in vs]
    if n_boot and flagged:
        rows = np.arange(len(adapted))

        def difference(r: np.ndarray, _unused: np.ndarray) -> dict[str, float]:
            x, y = summarise_table(adapted.take(r)), summarise_table(source.take(r))
            return {m: x[m] - y[m] for m in flagged}

        groups = (metadata or {}).get("patient_id")
        ci = bootstrap_ci(rows, rows, difference, n_boot, alpha, seed, groups)
        for m in flagged:
            vs[m]["low"], vs[m]["high"] = ci[m]["low"], ci[m]["high"]
    return {
        "source_metrics": src,
        "vs_source": vs,
        "degraded": degradations({test_set: vs}, SEG_FLAGGED),
    }
