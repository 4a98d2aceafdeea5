"""The numbers a report shows: a value, its confidence interval, the seed spread and n.

A cell is one condition's metric on one or more test sets (one set, the mean over corruptions at
one severity, the shifted mean, the worst set), optionally restricted to a subgroup. Its value is
the mean over seeds of each seed's value as the records hold it. Its interval is

- for one seed and one test set: the record's own bootstrap CI;
- otherwise: a percentile bootstrap of the whole cell from the stored predictions, resampling
  patients jointly (a drawn patient counts in every seed and every set of the cell), so the
  interval reflects how many patients the number rests on, not how many times they were scored.

The seed spread (standard deviation over seeds) is reported beside it, never mixed into it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from clinadapt.evaluation.bootstrap import draw_counts, percentile_ci
from clinadapt.evaluation.metric_info import metric_info
from clinadapt.evaluation.report.conditions import Condition
from clinadapt.evaluation.report.predictions import PredictionStore, SetPredictions
from clinadapt.evaluation.report.statistics import Replicates, gap, in_group, replicates

RECORD_CI = "record"
POOLED_CI = "pooled"


@dataclass(frozen=True)
class Cell:
    """One shown number with its interval, its seeds and what it rests on."""

    value: float
    seeds: tuple[float, ...] = ()
    low: float = math.nan
    high: float = math.nan
    ci: str = ""  # RECORD_CI, POOLED_CI, or "" when there is no interval
    n_images: float = math.nan  # per seed, summed over the cell's test sets
    n_patients: float = math.nan  # distinct patients per seed
    sets: int = 1

    @property
    def sd(self) -> float:
        """Standard deviation over seeds (NaN with one seed)."""
        return float(np.std(self.seeds, ddof=1)) if len(self.seeds) > 1 else math.nan

    @property
    def has_ci(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def text(self, digits: int = 3, sd: bool = True) -> str:
        """``0.712 (0.680–0.741)``, then ``; SD 0.012`` over several seeds."""
        if math.isnan(self.value):
            return "-"
        out = f"{self.value:.{digits}f}"
        if self.has_ci:
            out += f" ({self.low:.{digits}f}–{self.high:.{digits}f})"
        if sd and len(self.seeds) > 1:
            out += f"; SD {self.sd:.{digits}f}"
        return out

    def as_row(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "ci_low": self.low,
            "ci_high": self.high,
            "ci": self.ci,
            "seeds": len(self.seeds),
            "seed_values": " ".join(f"{v:.6g}" for v in self.seeds),
            "seed_sd": self.sd,
            "n_images": self.n_images,
            "n_patients": self.n_patients,
            "test_sets": self.sets,
        }


NAN_CELL = Cell(math.nan)


def _finite(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


class CellMaker:
    """Computes cells from the tidy table of the records and their stored predictions."""

    def __init__(
        self,
        frame: pd.DataFrame,
        predictions: PredictionStore,
        n_boot: int = 200,
        alpha: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.predictions = predictions
        self.n_boot, self.alpha, self.seed = n_boot, alpha, seed
        cols = ["run_id", "test_set", "subgroup_key", "subgroup", "metric"]
        self.rows: dict[tuple, dict[str, Any]] = {}
        self.counts: dict[tuple, tuple[float, float]] = {}
        for row in frame.to_dict("records"):
            key = tuple(None if pd.isna(row[c]) else row[c] for c in cols)
            self.rows[key] = row
            self.counts.setdefault(key[:4], (float(row["n_images"]), float(row["n_patients"])))
        self._memo: dict[tuple, Cell] = {}

    def row(
        self, record: dict[str, Any], test_set: str, metric: str, group: tuple | None = None
    ) -> dict[str, Any] | None:
        g = group or (None, None)
        return self.rows.get((record.get("run_id", ""), test_set, g[0], g[1], metric))

    def _value(
        self,
        record: dict[str, Any],
        test_set: str,
        metric: str,
        group: tuple | None,
        gap_key: str | None,
    ) -> float:
        if gap_key is not None:
            info = ((record.get("subgroups") or {}).get(test_set) or {}).get(gap_key) or {}
            v = (info.get("gap") or {}).get(metric)
            return float(v) if _finite(v) else math.nan
        row = self.row(record, test_set, metric, group)
        return math.nan if row is None else float(row["value"])

    def cell(
        self,
        cond: Condition,
        sets: list[str],
        metric: str,
        agg: str = "mean",
        group: tuple[str, str] | None = None,
        gap_key: str | None = None,
    ) -> Cell:
        """``metric`` of ``cond`` over ``sets`` (``agg``: mean, or worst by the metric's
        direction), on a metadata ``group`` or as the gap between the groups of ``gap_key``."""
        memo = (cond.key, tuple(sets), metric, agg, group, gap_key)
        if memo not in self._memo:
            self._memo[memo] = self._cell(cond, sets, metric, agg, group, gap_key)
        return self._memo[memo]

    def _cell(self, cond, sets, metric, agg, group, gap_key) -> Cell:
        higher = metric_info(metric, cond.first.get("metric_info")).higher_is_better
        if gap_key is not None:
            higher = False  # a smaller gap between groups is better
        per_seed, images, patients = [], [], []
        for r in cond.records:
            vals = [self._value(r, s, metric, group, gap_key) for s in sets]
            vals = [v for v in vals if not math.isnan(v)]
            if not vals:
                continue
            per_seed.append(_aggregate(vals, agg, higher))
            n_img, n_pat = self._counts(r, sets, group)
            images.append(n_img)
            patients.append(n_pat)
        if not per_seed:
            return NAN_CELL
        low = high = math.nan
        kind = ""
        if len(cond.records) == 1 and len(sets) == 1 and gap_key is None:
            row = self.row(cond.first, sets[0], metric, group)
            if row is not None and _finite(row["ci_low"]) and _finite(row["ci_high"]):
                low, high, kind = float(row["ci_low"]), float(row["ci_high"]), RECORD_CI
        if not kind:
            low, high = self._pooled(cond, sets, metric, agg, higher, group, gap_key)
            kind = POOLED_CI if not math.isnan(low) else ""
        return Cell(
            float(np.mean(per_seed)),
            tuple(per_seed),
            low,
            high,
            kind,
            float(np.mean(images)) if images else math.nan,
            float(np.nanmean(patients)) if any(not math.isnan(p) for p in patients) else math.nan,
            len(sets),
        )

    def _counts(
        self, record: dict[str, Any], sets: list[str], group: tuple | None
    ) -> tuple[float, float]:
        """Images summed over ``sets`` and distinct patients across them, for one run."""
        g = group or (None, None)
        known = self.counts.get((record.get("run_id", ""), sets[0], *g)) if len(sets) == 1 else None
        if known is not None and not math.isnan(known[1]):
            return known
        images, ids = 0.0, set()
        all_ids = True
        for s in sets:
            pred = self.predictions.get(record, s)
            if pred is None:
                return known or (math.nan, math.nan)
            mask = np.ones(len(pred), bool)
            if group is not None:
                if group[0] not in pred.meta:
                    return math.nan, math.nan
                mask = pred.meta[group[0]] == group[1]
            images += float(mask.sum())
            if pred.patients is None:
                all_ids = False
            else:
                ids.update(pred.patients[mask].tolist())
        return images, float(len(ids)) if all_ids else math.nan

    def _pooled(self, cond, sets, metric, agg, higher, group, gap_key) -> tuple[float, float]:
        members: list[list[tuple[SetPredictions, Replicates]]] = []
        for r in cond.records:
            seed_members = []
            for s in sets:
                pred = self.predictions.get(r, s)
                rep = replicates(metric, cond.task, r, s)
                if pred is None or rep is None:
                    return math.nan, math.nan
                if group is not None:
                    rep = in_group(rep, *group)
                if gap_key is not None:
                    rep = gap(rep, gap_key)
                seed_members.append((pred, rep))
            members.append(seed_members)
        reps = joint_bootstrap(members, agg, higher, self.n_boot, self.seed)
        ci = percentile_ci({"cell": reps}, self.alpha)["cell"]
        return (ci["low"], ci["high"]) if ci["n_boot"] >= 2 else (math.nan, math.nan)


def _aggregate(values: list[float], agg: str, higher_is_better: bool) -> float:
    if agg == "mean":
        return float(np.mean(values))
    if agg == "worst":
        return float(min(values) if higher_is_better else max(values))
    raise ValueError(f"unknown aggregation {agg!r}")


def _aggregate_rows(values: np.ndarray, agg: str, higher_is_better: bool) -> np.ndarray:
    """Row-wise mean or worst over the defined columns of (B, k) values; NaN for none."""
    ok = ~np.isnan(values)
    count = ok.sum(1)
    if agg == "mean":
        total = np.where(ok, values, 0.0).sum(1)
        out = np.divide(total, count, out=np.full(len(values), np.nan), where=count > 0)
    elif agg == "worst":
        fill = np.inf if higher_is_better else -np.inf
        pick = np.min if higher_is_better else np.max
        out = pick(np.where(ok, values, fill), 1)
        out[count == 0] = np.nan
    else:
        raise ValueError(f"unknown aggregation {agg!r}")
    return out


def resample_weights(
    members: list[SetPredictions], n_boot: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """(n_boot, n) weights of each member in turn: patients drawn with replacement once per
    resample and counted in every member that holds them; images drawn independently per member
    when any member lacks patient ids."""
    if all(p.patients is not None for p in members):
        units, inverse = np.unique(
            np.concatenate([p.patients.astype(str) for p in members]), return_inverse=True
        )
        counts = draw_counts(len(units), n_boot, rng)
        start = 0
        for p in members:
            yield counts[:, inverse[start : start + len(p)]]
            start += len(p)
        return
    for p in members:
        yield draw_counts(len(p), n_boot, rng)


def joint_bootstrap(
    members: list[list[tuple[SetPredictions, Replicates]]],
    agg: str,
    higher: bool,
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """Replicates of a cell: per resample, each seed's value aggregated over its sets, then the
    mean over seeds. ``members`` holds, per seed, (predictions, replicates) of each set."""
    flat = [m for seed_members in members for m in seed_members]
    weights = resample_weights([p for p, _ in flat], n_boot, np.random.default_rng(seed))
    values = [
        rep(pred, w) for (pred, rep), w in zip(flat, weights, strict=True)
    ]  # one member at a time
    per_seed, k = [], 0
    for seed_members in members:
        block = np.stack(values[k : k + len(seed_members)], 1)
        k += len(seed_members)
        per_seed.append(_aggregate_rows(block, agg, higher))
    return _aggregate_rows(np.stack(per_seed, 1), "mean", higher)
