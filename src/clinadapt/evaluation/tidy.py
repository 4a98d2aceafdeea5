"""Result records as one tidy table: a row per record x test set x metric, for pandas.

``load_records(path)`` is the table a paper's numbers come from; ``results.csv`` of a report is the
same table. Each row holds the value, its confidence interval as the record stores it (percentile
bootstrap over patients, or images when patient ids are unknown), the number of images and
patients behind it, and the run's model, target, method, shift and seed as separate columns.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from clinadapt.errors import DataError
from clinadapt.evaluation.labels import condition_label, shift_label, target_spec
from clinadapt.evaluation.metric_info import metric_info
from clinadapt.evaluation.metrics import AT_HALF
from clinadapt.evaluation.replicates import AT_THRESHOLD, SELECTIVE
from clinadapt.record import load_record, read_records
from clinadapt.shifts.corruption import parse_set_name

COLUMNS = (
    "run_id",
    "condition",
    "model",
    "target",
    "method",
    "method_kind",
    "source_method",
    "shift",
    "shift_label",
    "data",
    "task",
    "seed",
    "test_set",
    "in_domain",
    "corruption",
    "severity",
    "subgroup_key",
    "subgroup",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "ci_level",
    "ci_unit",
    "n_images",
    "n_patients",
    "higher_is_better",
    "setting",
)
# record parts that hold one number per test set and metric besides ``metrics``: selective
# prediction, and the binary operating point (sensitivity, specificity, PPV, NPV)
OPERATING_POINT = AT_THRESHOLD


AT_HALF_SETTING = {name: "threshold 0.5" for name in AT_HALF.values()}


def is_run_record(record: Any) -> bool:
    """Whether a JSON object is a run's result record (not a summary or a foreign file)."""
    return isinstance(record, dict) and "metrics" in record and "config" in record


def _is_number(x: Any) -> bool:
    """A metric value (None: undefined), not a nested part such as a per-class dict."""
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _num(x: Any) -> float:
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def operating_rule(op: dict[str, Any]) -> str:
    """``score >= 0.412 (chosen on validation (sensitivity >= 0.9))`` for an operating point."""
    return f"score >= {_num(op.get('threshold')):.3g} (chosen on {op.get('chosen_on', '?')})"


def _run_columns(record: dict[str, Any]) -> dict[str, Any]:
    cfg = record["config"]
    return {
        "run_id": record.get("run_id", ""),
        "condition": condition_label(record),
        "model": cfg.get("model"),
        "target": target_spec(record),
        "method": cfg.get("method"),
        "method_kind": (record.get("method") or {}).get("kind"),
        "source_method": (record.get("source") or {}).get("method"),
        "shift": (record.get("shift") or {}).get("protocol", cfg.get("shift")),
        "shift_label": shift_label(record),
        "data": cfg.get("data"),
        "task": (record.get("data") or {}).get("task"),
        "seed": cfg.get("seed"),
    }


def _set_columns(record: dict[str, Any], name: str) -> dict[str, Any]:
    parsed = parse_set_name(name)
    counts = (record.get("counts") or {}).get(name) or {}
    n = counts.get("images", (record["metrics"].get(name) or {}).get("n"))
    return {
        "test_set": name,
        "in_domain": name in set((record.get("shift") or {}).get("in_domain", [])),
        "corruption": parsed[0] if parsed else None,
        "severity": parsed[1] if parsed else None,
        "n_images": _num(n),
        "n_patients": _num(counts.get("patients")),
    }


def _row(
    base: dict[str, Any],
    metric: str,
    value: Any,
    ci: dict[str, Any] | None,
    ci_meta: dict[str, Any],
    declared: dict[str, Any] | None,
    setting: str | None = None,
) -> dict[str, Any]:
    ci = ci or {}
    alpha = ci_meta.get("alpha")
    row = {
        **base,
        "subgroup_key": None,
        "subgroup": None,
        "metric": metric,
        "value": _num(value),
        "ci_low": _num(ci.get("low")),
        "ci_high": _num(ci.get("high")),
        "ci_level": 1 - alpha if ci and alpha is not None else math.nan,
        "ci_unit": ci_meta.get("unit") if ci else None,
        "higher_is_better": metric_info(metric, declared).higher_is_better,
        "setting": setting,
    }
    return row


def record_rows(record: dict[str, Any], subgroups: bool = False) -> list[dict[str, Any]]:
    """The tidy rows of one record: per test set its metrics, selective prediction and (binary)
    operating point; with ``subgroups`` also each metadata group's metrics."""
    run = _run_columns(record)
    declared = record.get("metric_info")
    rows: list[dict[str, Any]] = []
    for name, metrics in (record.get("metrics") or {}).items():
        base = {**run, **_set_columns(record, name)}
        ci_set = (record.get("ci") or {}).get(name) or {}
        ci_meta = {"alpha": ci_set.get("alpha"), "unit": ci_set.get("unit")}
        op = (record.get("operating_point") or {}).get(name) or {}
        rule = operating_rule(op) if op else None
        for metric, value in metrics.items():
            if metric != "n" and _is_number(value):
                setting = rule if metric in OPERATING_POINT else AT_HALF_SETTING.get(metric)
                rows.append(
                    _row(base, metric, value, ci_set.get(metric), ci_meta, declared, setting)
                )
        for metric in OPERATING_POINT:
            if metric in op and metric not in metrics:
                rows.append(
                    _row(base, metric, op[metric], ci_set.get(metric), ci_meta, declared, rule)
                )
        sel = (record.get("selective") or {}).get(name) or {}
        for metric in SELECTIVE:
            if metric in sel:
                setting = f"target error {sel['target_error']}" if "target_error" in sel else None
                rows.append(
                    _row(base, metric, sel[metric], ci_set.get(metric), ci_meta, declared, setting)
                )
        if subgroups:
            rows += _subgroup_rows(record, name, base, ci_meta, declared)
    return rows


def _subgroup_rows(
    record: dict[str, Any],
    name: str,
    base: dict[str, Any],
    ci_meta: dict[str, Any],
    declared: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    rows = []
    for key, info in ((record.get("subgroups") or {}).get(name) or {}).items():
        for group, values in (info.get("groups") or {}).items():
            cis = values.get("ci") or {}
            counts = {"n_images": _num(values.get("n")), "n_patients": _num(values.get("patients"))}
            for metric, value in values.items():
                if metric in ("n", "patients", "ci") or not _is_number(value):
                    continue
                row = _row({**base, **counts}, metric, value, cis.get(metric), ci_meta, declared)
                row.update(subgroup_key=key, subgroup=str(group))
                rows.append(row)
    return rows


def records_frame(records: Iterable[dict[str, Any]], subgroups: bool = False) -> pd.DataFrame:
    """The tidy table of ``records`` (see :data:`COLUMNS`)."""
    rows = [row for r in records if is_run_record(r) for row in record_rows(r, subgroups)]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["seed"] = df["seed"].astype("Int64")
    df["severity"] = df["severity"].astype("Int64")
    df["in_domain"] = df["in_domain"].astype(bool)
    df["higher_is_better"] = df["higher_is_better"].astype(bool)
    for col in ("value", "ci_low", "ci_high", "ci_level", "n_images", "n_patients"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def records_at(path: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """The run records in a directory (unreadable files skipped, each with a warning), a single
    record file, or a list of them."""
    if isinstance(path, (str, Path)):
        p = Path(path)
        if p.is_dir():
            return [r for r in read_records(p)[0] if is_run_record(r)]
        if not p.exists():
            raise DataError(f"no such result record or directory: {str(p)!r}")
        paths = [p]
    else:
        paths = [Path(x) for x in path]
    return [r for r in (load_record(p) for p in paths) if is_run_record(r)]


def load_records(path: str | Path | Iterable[str | Path], subgroups: bool = False) -> pd.DataFrame:
    """Result records as a pandas DataFrame, one row per record x test set x metric.

    ``path`` is a directory of records (as ``clinadapt run --out`` writes), one record JSON or a
    list of them. Columns: see :data:`COLUMNS`; ``ci_low``/``ci_high`` are the record's bootstrap
    interval (``ci_unit`` says whether patients or images were resampled, ``ci_level`` its level),
    NaN where the record has none. ``subgroups=True`` adds a row per metadata group (sex, age
    group, site, ...), with ``subgroup_key`` and ``subgroup`` set.
    """
    return records_frame(records_at(path), subgroups)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def history_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-epoch training history: the run's own fit, or the source training of a TTA run."""
    fits = (
        ("fit", record.get("training")),
        ("source", (record.get("source") or {}).get("training")),
    )
    return [{"stage": stage, **h} for stage, fit in fits for h in (fit or {}).get("history") or []]


def trace_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-batch test-time adaptation trace, one row per batch, with its test set."""
    rows = []
    for name, cols in ((record.get("tta") or {}).get("trace") or {}).items():
        if not cols:
            continue
        n = max(len(v) for v in cols.values() if isinstance(v, list))
        for i in range(n):
            rows.append(
                {
                    "test_set": name,
                    **{
                        k: (v[i] if isinstance(v, list) and i < len(v) else None)
                        for k, v in cols.items()
                    },
                }
            )
    return rows


def run_tables(record: dict[str, Any]) -> dict[str, str]:
    """CSV files to write next to a record: ``history.csv`` (per epoch) and ``trace.csv`` (TTA
    streams, per batch), each only when the record has such data."""
    out = {}
    if rows := history_rows(record):
        out["history.csv"] = _csv_text(rows)
    if rows := trace_rows(record):
        out["trace.csv"] = _csv_text(rows)
    return out
