"""Group result records into conditions (everything but the seed) and average them over seeds."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from clinadapt.evaluation.subgroups import lower_is_better
from clinadapt.shifts.corruption import CLEAN, parse_set_name

SEVERITY_COLUMNS = tuple(f"severity {s}" for s in range(1, 6))


def shift_label(record: dict[str, Any]) -> str:
    """The shift protocol and the options that set it apart, e.g. ``domain (source site-a)``."""
    shift = record.get("shift", {})
    name, opts = shift.get("protocol", record["config"].get("shift", "?")), shift.get("options", {})
    if name == "domain" and opts.get("source"):
        return f"domain (source {', '.join(map(str, opts['source']))})"
    if name == "lodo":
        return f"leave-one-domain-out (holdout {opts.get('holdout')})"
    if name == "prevalence" and opts.get("prevalence"):
        mix = ", ".join(f"{p:.2f}" for p in opts["prevalence"])
        return f"prevalence ({mix})"
    return name


def target_label(record: dict[str, Any]) -> str:
    """What a run adapted: its target, or what it changed when it trained no parameter."""
    target = record.get("target", {})
    if target.get("trainable") == 0 and target.get("changes"):
        return str(target["changes"])  # bn: normalisation statistics, not the source's "full"
    return target.get("spec") or record["config"].get("target") or "default"


def condition_label(record: dict[str, Any]) -> str:
    """``method (model, target)`` of a record."""
    cfg = record["config"]
    return f"{cfg['method']} ({cfg['model']}, {target_label(record)})"


def condition_key(record: dict[str, Any]) -> str:
    """What makes a run's experiment, except its seed."""
    cfg = {k: v for k, v in record["config"].items() if k not in ("seed", "out_dir", "device")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def columns(record: dict[str, Any], metric: str) -> dict[str, float]:
    """The values a table shows for one run: each test set, or for corruption runs the clean set
    and each severity averaged over corruptions; then the shifted mean and the worst set."""
    sets = {k: v.get(metric) for k, v in record.get("metrics", {}).items()}
    sets = {k: float(v) for k, v in sets.items() if v is not None}
    out: dict[str, float] = {}
    by_sev: dict[int, list[float]] = {}
    for name, v in sets.items():
        parsed = parse_set_name(name)
        if parsed is None:
            out[name] = v
        else:
            by_sev.setdefault(parsed[1], []).append(v)
    for sev in sorted(by_sev):
        out[f"severity {sev}"] = float(np.mean(by_sev[sev]))
    in_domain = set(record.get("shift", {}).get("in_domain", []))
    shifted = [v for k, v in sets.items() if k not in in_domain]
    if shifted:
        out["shifted mean"] = float(np.mean(shifted))
        out["worst"] = float(max(sets.values()) if lower_is_better(metric) else min(sets.values()))
    return out


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval over seeds; NaN bounds for a single seed."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


@dataclass
class Condition:
    """The runs of one experiment over seeds."""

    key: str
    label: str
    shift: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(r["config"]["seed"] for r in self.records)

    @property
    def method(self) -> str:
        return self.records[0]["config"]["method"]

    @property
    def in_domain(self) -> set[str]:
        return {s for r in self.records for s in r.get("shift", {}).get("in_domain", [])}

    def table(self, metric: str) -> dict[str, tuple[float, float, float]]:
        """Column -> (mean, CI low, CI high) over seeds."""
        per = [columns(r, metric) for r in self.records]
        cols: list[str] = []
        for p in per:
            cols += [c for c in p if c not in cols]
        return {c: mean_ci([p[c] for p in per if c in p]) for c in cols}


def group_conditions(records: list[dict[str, Any]]) -> list[Condition]:
    """Conditions by shift, fit methods first; labels made unique where options differ."""
    groups: dict[str, Condition] = {}
    for r in records:
        key = condition_key(r)
        if key not in groups:
            groups[key] = Condition(key, condition_label(r), shift_label(r))
        groups[key].records.append(r)
    seen: dict[tuple[str, str], int] = {}
    for g in groups.values():
        seen[(g.shift, g.label)] = seen.get((g.shift, g.label), 0) + 1
    for g in groups.values():
        if seen[(g.shift, g.label)] > 1:
            g.label = f"{g.label} [{g.key[:6]}]"
    # sources (fit methods) before the test-time methods that start from them
    return sorted(groups.values(), key=lambda g: (g.shift, "source" in g.records[0], g.label))


def format_cell(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``0.712 ± 0.031`` (half-width of the interval), or the mean alone for one seed."""
    if math.isnan(mean):
        return "-"
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"


__all__ = [
    "CLEAN",
    "SEVERITY_COLUMNS",
    "Condition",
    "columns",
    "format_cell",
    "group_conditions",
    "mean_ci",
]
