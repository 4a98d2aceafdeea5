"""Tables (Markdown, CSV) and a self-contained HTML report from a directory of result records."""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import DataError
from clinadapt.evaluation.aggregate import (
    Condition,
    format_cell,
    group_conditions,
    mean_ci,
    target_label,
)
from clinadapt.evaluation.aggregate import columns as record_columns
from clinadapt.evaluation.plots import (
    domain_bars,
    reliability_diagrams,
    risk_coverage_plot,
    severity_curves,
)
from clinadapt.record import check_metric, read_records
from clinadapt.store import atomic_write_bytes, list_records

CSV_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
SUBGROUP_KEYS = ("domain", "scanner", "sex", "age_group")


def run_label(record: dict[str, Any]) -> str:
    """``method (model, target, seed N)`` of one run."""
    cfg = record["config"]
    return f"{cfg['method']} ({cfg['model']}, {target_label(record)}, seed {cfg['seed']})"


def results_table(
    records: list[dict[str, Any]], metric: str = "balanced_accuracy"
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run, one column per test set (corruption runs: per severity,
    averaged over corruptions), then the shifted mean and the worst set."""
    cols: list[str] = []
    per = [record_columns(r, metric) for r in records]
    for p in per:
        cols += [c for c in p if c not in cols and c not in ("shifted mean", "worst")]
    in_dom = {s for r in records for s in r.get("shift", {}).get("in_domain", [])}
    header = ["run", *[f"{c} (in-domain)" if c in in_dom else c for c in cols]]
    header += ["shifted mean", "worst"]
    rows = []
    for r, p in zip(records, per, strict=True):
        row = [run_label(r)] + [f"{p[c]:.3f}" if c in p else "-" for c in cols]
        row.append(f"{p['shifted mean']:.3f}" if "shifted mean" in p else "-")
        summ = r.get("summary", {}).get(metric, {})
        worst = summ.get("worst_set")
        row.append(f"{p['worst']:.3f} ({worst})" if "worst" in p and worst else "-")
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _baseline(c: Condition, conditions: list[Condition]) -> Condition | None:
    """For a test-time method, the condition that evaluates its source model unchanged."""
    src = c.records[0].get("source")
    if not src:
        return None
    cfg = c.records[0]["config"]
    for other in conditions:
        o = other.records[0]["config"]
        if other is c or other.shift != c.shift or o["model"] != cfg["model"]:
            continue
        if o["method"] == "source" or (
            o["method"] == src.get("method") and o.get("method_options") == src.get("options")
        ):
            return other
    return None


def summary_table(
    conditions: list[Condition], everything: list[Condition], metric: str
) -> tuple[list[str], list[list[str]]]:
    """Mean ± 95% CI over seeds per column, and what a test-time method gains over its source."""
    tables = [c.table(metric) for c in conditions]
    cols: list[str] = []
    for t in tables:
        cols += [k for k in t if k not in cols and k not in ("shifted mean", "worst")]
    in_dom = set().union(*(c.in_domain for c in conditions))
    header = ["condition", "seeds", *[f"{k} (in-domain)" if k in in_dom else k for k in cols]]
    header += ["shifted mean", "worst", "Δ shifted vs source"]
    rows = []
    for c, t in zip(conditions, tables, strict=True):
        row = [c.label, str(len(c.records))]
        row += [format_cell(*t[k]) if k in t else "-" for k in [*cols, "shifted mean", "worst"]]
        base = _baseline(c, everything)
        if base is not None and "shifted mean" in t and "shifted mean" in base.table(metric):
            delta = t["shifted mean"][0] - base.table(metric)["shifted mean"][0]
            row.append(f"{delta:+.3f} (vs {base.method})")
        else:
            row.append("-")
        rows.append(row)
    return header, rows


def _shifted_mean(record: dict[str, Any], part: str, field: str) -> float | None:
    in_dom = set(record.get("shift", {}).get("in_domain", []))
    vals = [
        v.get(field)
        for name, v in record.get(part, {}).items()
        if name not in in_dom and isinstance(v, dict)
    ]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _gap(record: dict[str, Any], key: str, metric: str) -> float | None:
    vals = [
        sets[key]["gap"].get(metric)
        for sets in record.get("subgroups", {}).values()
        if key in sets and metric in sets[key].get("gap", {})
    ]
    return float(np.mean(vals)) if vals else None


def clinical_table(conditions: list[Condition], metric: str) -> tuple[list[str], list[list[str]]]:
    """Calibration, selective prediction and subgroup gaps on the shifted sets, over seeds."""
    keys = [
        k
        for k in SUBGROUP_KEYS
        if any(_gap(r, k, metric) is not None for c in conditions for r in c.records)
    ]
    header = ["condition", "ECE", "AURC", "coverage at target error"]
    header += [f"{metric.replace('_', ' ')} gap by {k}" for k in keys]
    rows = []
    for c in conditions:
        cells = [
            [_shifted_mean(r, "metrics", "ece") for r in c.records],
            [_shifted_mean(r, "selective", "aurc") for r in c.records],
            [_shifted_mean(r, "selective", "coverage_at_target") for r in c.records],
            *[[_gap(r, k, metric) for r in c.records] for k in keys],
        ]
        row = [c.label]
        for vals in cells:
            vals = [v for v in vals if v is not None]
            row.append(format_cell(*mean_ci(vals)) if vals else "-")
        rows.append(row)
    return header, rows


def _csv(conditions: list[Condition]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["shift", "condition", "column", "metric", "mean", "ci_low", "ci_high", "seeds"])
    for c in conditions:
        for metric in CSV_METRICS:
            for col, (m, lo, hi) in c.table(metric).items():
                nums = [_num(x) for x in (m, lo, hi)]
                w.writerow([c.shift, c.label, col, metric, *nums, len(c.records)])
    return buf.getvalue()


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}"></figure>'


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child
{text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{margin:0.5em 0}
.note{color:#555;font-size:13px}"""


def write_report(
    runs_dir: str | Path, out_dir: str | Path | None = None, metric: str = "balanced_accuracy"
) -> Path:
    """Write ``report.md``, ``results.csv`` and a self-contained ``report.html``; return the HTML path."""
    runs_dir = Path(runs_dir)
    if not list_records(runs_dir):
        raise DataError(
            f"no result records (*.json) in {str(runs_dir)!r}; run `clinadapt run` first"
        )
    records, skipped = read_records(runs_dir)  # unreadable files: skipped, each with a warning
    if not records:
        raise DataError(
            f"no readable result records in {str(runs_dir)!r} ({len(skipped)} file(s) skipped)"
        )
    check_metric(records, metric)
    out = Path(out_dir or runs_dir)
    conditions = group_conditions(records)
    by_shift: dict[str, list[Condition]] = {}
    for c in conditions:
        by_shift.setdefault(c.shift, []).append(c)
    pretty = metric.replace("_", " ")
    md = [
        f"# clinadapt report\n\n{len(records)} runs, {len(conditions)} conditions; {pretty}, "
        "mean ± half-width of the 95% CI over seeds.\n"
    ]
    body = [
        "<h1>clinadapt report</h1>",
        f'<p class="note">{len(records)} runs in {len(conditions)} conditions from '
        f"<code>{html.escape(runs_dir.name)}</code>. Cells: {html.escape(pretty)}, mean ± half-width "
        "of the 95% confidence interval over seeds (t distribution). "
        "Δ shifted vs source: what a test-time method recovers on the shifted sets over the source "
        "model it starts from.</p>",
    ]
    for shift, conds in by_shift.items():
        header, rows = summary_table(conds, conditions, metric)
        md += [f"## {shift}\n", markdown_table(header, rows) + "\n"]
        body += [f"<h2>{html.escape(shift)}</h2>", _html_table(header, rows)]
        if any(c.records[0].get("shift", {}).get("protocol") == "corruption" for c in conds):
            body.append(_img(severity_curves(conds, metric), f"{pretty} against severity"))
        else:
            body.append(
                _img(domain_bars(conds, metric, f"{pretty} per test set — {shift}"), pretty)
            )
        header, rows = clinical_table(conds, metric)
        md += [
            "Calibration, selective prediction and subgroup gaps (shifted sets)\n",
            markdown_table(header, rows) + "\n",
        ]
        body += [
            "<h3>Calibration, selective prediction, subgroup gaps (shifted sets)</h3>",
            _html_table(header, rows),
        ]
    rel = reliability_diagrams(conditions, runs_dir)
    rc = risk_coverage_plot(conditions, runs_dir)
    body.append("<h2>Reliability</h2>")
    body.append(
        _img(rel, "reliability diagrams")
        if rel
        else '<p class="note">no stored predictions (predictions/*.npz) to plot.</p>'
    )
    body.append("<h2>Risk-coverage on the shifted sets</h2>")
    body.append(
        _img(rc, "risk-coverage curves")
        if rc
        else '<p class="note">no stored predictions (predictions/*.npz) to plot.</p>'
    )
    header, rows = results_table(records, metric)
    md += ["## Runs\n", markdown_table(header, rows) + "\n"]
    body += ["<h2>Runs</h2>", _html_table(header, rows)]
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    atomic_write_bytes(out / "results.csv", _csv(conditions).encode())
    page = (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>clinadapt report</title>'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = out / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
