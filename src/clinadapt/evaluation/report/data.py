"""Everything a report is drawn from, read once: records, their tidy table, predictions, cells."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clinadapt.evaluation.metric_info import MetricInfo, metric_info
from clinadapt.evaluation.report.cells import Cell, CellMaker
from clinadapt.evaluation.report.conditions import Condition, group_conditions
from clinadapt.evaluation.report.figures import Figure
from clinadapt.evaluation.report.predictions import PredictionStore
from clinadapt.evaluation.report.style import Style, assign_styles
from clinadapt.evaluation.tidy import records_frame
from clinadapt.shifts.corruption import parse_set_name

# a section's headline metric when none is asked for, by the data's task (first one present;
# then the task's own headline, tasks.base.Task.headline)
DEFAULT_METRICS = {
    "multiclass": ("balanced_accuracy", "accuracy"),
    "binary": ("balanced_accuracy", "auroc"),
    "multilabel": ("auroc", "accuracy"),
    "segmentation": ("dice_present", "dice"),
}


@dataclass
class Table:
    """A table of text cells; ``note`` says what the cells are."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Block:
    """What one panel adds to a section of the report."""

    heading: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Column:
    """A table column or an x position: the test sets it combines and how."""

    name: str
    sets: list[str]
    agg: str = "mean"
    in_domain: bool = False


class ReportData:
    """Records grouped into conditions, their tidy table, predictions and computed cells."""

    def __init__(
        self, runs_dir: Path, records: list[dict[str, Any]], metric: str, n_boot: int, alpha: float
    ) -> None:
        self.runs_dir = runs_dir
        self.records = records
        self.asked = metric  # the metric asked for ("" when none: each section its task's own)
        self.metric = metric
        self.conditions: list[Condition] = group_conditions(records)
        self.frame: pd.DataFrame = records_frame(records, subgroups=True)
        self.predictions = PredictionStore(runs_dir)
        self.cells = CellMaker(self.frame, self.predictions, n_boot, alpha)
        self.n_boot, self.alpha = n_boot, alpha
        self.styles: dict[str, Style] = assign_styles([c.label for c in self.conditions])
        self.sections: dict[str, list[Condition]] = {}
        for c in self.conditions:
            self.sections.setdefault(c.section, []).append(c)

    def info(self, metric: str) -> MetricInfo:
        declared = next((r.get("metric_info") for r in self.records if r.get("metric_info")), None)
        return metric_info(metric, declared)

    def metric_for(self, conds: list[Condition]) -> str:
        """The headline metric of a section: the one asked for, else its task's default (the
        first of :data:`DEFAULT_METRICS` the records hold, else the task's headline)."""
        from clinadapt.tasks.base import headline_metric

        if self.asked:
            return self.asked
        available = self.metrics(conds)
        task = conds[0].task if conds else ""
        for m in (*DEFAULT_METRICS.get(task, ()), headline_metric([c.first for c in conds])):
            if m in available:
                return m
        return sorted(available)[0] if available else self.metric

    def metrics(self, conds: list[Condition] | None = None) -> set[str]:
        """Metrics the records of ``conds`` (default: all) hold for whole test sets."""
        df = self.frame[self.frame["subgroup_key"].isna()]
        if conds is not None:
            ids = {r.get("run_id", "") for c in conds for r in c.records}
            df = df[df["run_id"].isin(ids)]
        return set(df["metric"].unique())

    def figure_row(self, panel: str, cond: Condition, x: str, cell: Cell, **extra: Any) -> dict:
        """One plotted number with what it is, how it is drawn, its interval and n."""
        style = self.styles[cond.label]
        return {
            "panel": panel,
            "section": cond.section,
            "condition": cond.label,
            "x": x,
            **extra,
            **cell.as_row(),
            "colour": style.colour,
            "linestyle": style.linestyle,
            "marker": style.marker,
        }

    def cell(self, cond: Condition, col: Column, metric: str, **kw: Any) -> Cell:
        return self.cells.cell(cond, col.sets, metric, col.agg, **kw)


def set_columns(conds: list[Condition]) -> list[Column]:
    """Columns of a section: each test set; corruption sets become one column per severity that
    ran (mean over corruptions); then the shifted mean and the worst set."""
    in_dom = set().union(*(c.in_domain for c in conds))
    sets: list[str] = []
    for c in conds:
        sets += [s for s in c.sets if s not in sets]
    cols: list[Column] = []
    by_sev: dict[int, list[str]] = {}
    for s in sets:
        parsed = parse_set_name(s)
        if parsed is None:
            cols.append(Column(s, [s], in_domain=s in in_dom))
        else:
            by_sev.setdefault(parsed[1], []).append(s)
    cols += [Column(f"severity {sev}", by_sev[sev]) for sev in sorted(by_sev)]
    shifted = [s for s in sets if s not in in_dom]
    if shifted and len(sets) > 1:
        cols.append(Column("shifted mean", shifted))
        cols.append(Column("worst", sets, agg="worst"))
    return cols


def shifted_sets(conds: list[Condition]) -> tuple[list[str], str]:
    """The shifted test sets of a section (its in-domain sets when nothing is shifted)."""
    in_dom = set().union(*(c.in_domain for c in conds))
    sets: list[str] = []
    for c in conds:
        sets += [s for s in c.sets if s not in sets]
    shifted = [s for s in sets if s not in in_dom]
    return (shifted, "shifted sets") if shifted else (sets, "test sets")
