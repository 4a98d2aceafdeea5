"""Panels on calibration and selective prediction (single-label classification)."""

from __future__ import annotations

import numpy as np

from clinadapt.evaluation.metrics import ECE_BINS, reliability_bins
from clinadapt.evaluation.report.conditions import Condition
from clinadapt.evaluation.report.data import Block, Column, ReportData, Table, shifted_sets
from clinadapt.evaluation.report.figures import Figure, slug
from clinadapt.evaluation.report.panels import (
    MAX_PANELS,
    SINGLE_LABEL,
    ci_note,
    register_panel,
    subgroup_keys,
)
from clinadapt.evaluation.report.plots import Reliability, reliability, risk_coverage
from clinadapt.evaluation.selective import risk_coverage_curve

GREY = "#7f7f7f"


def target_errors(conds: list[Condition]) -> list[float]:
    """The target errors behind "coverage at target error" in these records."""
    found = {
        sel["target_error"]
        for c in conds
        for r in c.records
        for sel in (r.get("selective") or {}).values()
        if "target_error" in sel
    }
    return sorted(found)


@register_panel(
    "clinical", 30, SINGLE_LABEL, help="calibration, selective prediction and subgroup gaps"
)
def clinical(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    sets, which = shifted_sets(conds)
    Column(which, sets)
    available = data.metrics(conds)
    targets = target_errors(conds)
    target = "/".join(f"{t:g}" for t in targets) or "?"
    columns: list[tuple[str, dict]] = []
    if "ece" in available:
        columns.append((f"ECE ({ECE_BINS} bins)", {"metric": "ece"}))
    if "aurc" in available:
        columns.append(("AURC", {"metric": "aurc"}))
    if "coverage_at_target" in available:
        columns.append((f"coverage at error ≤ {target}", {"metric": "coverage_at_target"}))
    metric = data.metric_for(conds)
    for key in subgroup_keys(conds):
        columns.append(
            (
                f"{data.info(metric).label} gap by {key.replace('_', ' ')}",
                {"metric": metric, "gap_key": key},
            )
        )
    if not columns:
        return None
    header = ["condition", *[name for name, _ in columns]]
    rows = [[c.label, *[data.cells.cell(c, sets, **kw).text() for _, kw in columns]] for c in conds]
    note = (
        f"Means over the {len(sets)} {which} of each set's value. Coverage at error ≤ {target}: "
        "the largest share of cases the model can answer, most confident first, while the error "
        "on the answered cases stays at or below that target. Gap: best minus worst group. "
        + ci_note(data, conds)
    )
    table = Table(
        f"calibration, selective prediction and subgroup gaps ({which})", header, rows, note
    )
    block = Block(f"calibration and selective prediction ({which})", [table])
    for fig in (
        reliability_figure(data, section, conds),
        risk_coverage_figure(data, section, conds),
    ):
        if fig is not None:
            block.figures.append(fig)
    return block


def _pooled(data: ReportData, c: Condition, sets: list[str]):
    ys, ps = [], []
    for r in c.records:
        for s in sets:
            pred = data.predictions.get(r, s)
            if pred is not None and pred.labels.ndim == 1:
                ys.append(pred.labels)
                ps.append(pred.probs)
    if not ys or len({p.shape[1] for p in ps}) != 1:
        return None
    return np.concatenate(ys), np.concatenate(ps)


def reliability_figure(data: ReportData, section: str, conds: list[Condition]) -> Figure | None:
    """Accuracy against confidence per condition, in-domain and shifted sets pooled over seeds;
    the ECE in the legend is the table's (mean of each set's ECE), bins the ECE's bins."""
    in_dom = sorted(set().union(*(c.in_domain for c in conds)))
    shifted, which = shifted_sets(conds)
    parts = [("in-domain", in_dom, GREY)] if in_dom and shifted != in_dom else []
    panels, rows = [], []
    for c in conds[:MAX_PANELS]:
        drawn = []
        for part, sets, colour in [*parts, (which, shifted, data.styles[c.label].colour)]:
            pooled = _pooled(data, c, sets)
            if pooled is None:
                continue
            b = reliability_bins(*pooled, ECE_BINS)
            ece = data.cells.cell(c, sets, "ece")
            drawn.append(
                Reliability(
                    part,
                    colour,
                    b["accuracy"],
                    b["confidence"],
                    b["count"],
                    f"{part}: ECE {ece.text()}",
                )
            )
            rows.append(data.figure_row("reliability-ece", c, part, ece, metric="ece"))
            rows += [
                {
                    "panel": "reliability",
                    "condition": c.label,
                    "part": part,
                    "bin_low": lo,
                    "bin_high": lo + 1 / ECE_BINS,
                    "count": int(n),
                    "accuracy": a,
                    "confidence": conf,
                }
                for lo, n, a, conf in zip(
                    b["edges"][:-1], b["count"], b["accuracy"], b["confidence"], strict=True
                )
            ]
        if drawn:
            panels.append((c.label, drawn))
    if not panels:
        return None
    fig = reliability(panels, ECE_BINS)
    return Figure(
        f"{slug(section)}_reliability",
        f"reliability — {section}",
        f"Bars: accuracy of the cases in each of {ECE_BINS} equal-width confidence bins, the test "
        "sets pooled over seeds; below, how many cases each bin holds. The ECE in the legend is "
        "the table's: the mean of each test set's ECE, with its 95% CI.",
        fig,
        rows,
    )


def risk_coverage_figure(data: ReportData, section: str, conds: list[Condition]) -> Figure | None:
    """Selective risk against coverage, the shifted sets pooled over seeds; AURC as in the table."""
    sets, which = shifted_sets(conds)
    curves_, rows = [], []
    for c in conds:
        pooled = _pooled(data, c, sets)
        if pooled is None:
            continue
        cov, risk = risk_coverage_curve(*pooled)
        cell = data.cells.cell(c, sets, "aurc")
        curves_.append((f"{c.label}: AURC {cell.text()}", data.styles[c.label], cov, risk))
        rows.append(data.figure_row("risk-coverage", c, "AURC", cell))
    if not curves_:
        return None
    targets = target_errors(conds)
    fig = risk_coverage(section, curves_, targets[0] if len(targets) == 1 else None)
    return Figure(
        f"{slug(section)}_risk-coverage",
        f"risk-coverage on the {which} — {section}",
        f"Curves pool the {which} over seeds; the AURC in the legend is the table's (mean of each "
        "set's AURC) with its 95% CI; the dotted line is the target error of the coverage column.",
        fig,
        rows,
    )
