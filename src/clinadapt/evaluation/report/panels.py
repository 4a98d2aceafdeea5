"""Report panels: each adds tables and figures to a section (one dataset and shift).

A panel is registered with the tasks it applies to (None: every task) and an order; the report
shows, per section, every panel whose tasks include the section's task and that finds something
to show. A task brings its own panels (segmentation overlays, ...) by registering them here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from clinadapt._registry import Registry
from clinadapt.evaluation.report.cells import Cell
from clinadapt.evaluation.report.conditions import Condition, baseline
from clinadapt.evaluation.report.data import (
    Block,
    Column,
    ReportData,
    Table,
    set_columns,
    shifted_sets,
)
from clinadapt.evaluation.report.figures import Figure, slug
from clinadapt.evaluation.report.plots import Series, bars, curves, stream_traces
from clinadapt.shifts.corruption import CLEAN, parse_set_name

MAX_PANELS = 12
PanelFn = Callable[[ReportData, str, list[Condition]], Block | None]


@dataclass(frozen=True)
class Panel:
    name: str
    fn: PanelFn
    order: int
    tasks: frozenset[str] | None  # None: every task

    def applies(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


PANELS: Registry[Panel] = Registry("report panel")
CLASSIFICATION = frozenset({"multiclass", "binary", "multilabel"})
SINGLE_LABEL = frozenset({"multiclass", "binary"})


def register_panel(
    name: str, order: int, tasks: frozenset[str] | None = None, help: str = ""
) -> Callable[[PanelFn], PanelFn]:
    """Register a panel function ``fn(data, section, conditions) -> Block | None``."""

    def add(fn: PanelFn) -> PanelFn:
        PANELS.register(name, Panel(name, fn, order, tasks), help=help or (fn.__doc__ or ""))
        return fn

    return add


def panels_for(task: str) -> list[Panel]:
    """The panels of ``task``, in report order."""
    return sorted((e.obj for e in PANELS.entries() if e.obj.applies(task)), key=lambda p: p.order)


# ---- helpers shared by the panels ----


def n_text(cells: list[Cell]) -> str:
    """``81 img / 27 pat`` (a range when conditions differ)."""

    def fmt(vals: list[float], unit: str) -> str:
        vals = sorted({round(v) for v in vals if not math.isnan(v)})
        if not vals:
            return f"? {unit}"
        return f"{vals[0]} {unit}" if len(vals) == 1 else f"{vals[0]}–{vals[-1]} {unit}"

    return (
        f"{fmt([c.n_images for c in cells], 'img')} / {fmt([c.n_patients for c in cells], 'pat')}"
    )


def ci_note(data: ReportData, conds: list[Condition]) -> str:
    """What the numbers in brackets and the SD are."""
    level = f"{100 * (1 - data.alpha):g}%"
    units = {
        str(((r.get("ci") or {}).get(s) or {}).get("unit"))
        for c in conds
        for r in c.records
        for s in (r.get("ci") or {})
    } - {"None"}
    unit = (
        "patients"
        if units == {"patient"}
        else "images"
        if units == {"image"}
        else "patients or images"
    )
    multi = any(len(c.records) > 1 for c in conds)
    text = (
        f"Value ({level} CI). For one seed and one test set the CI is the record's percentile "
        f"bootstrap over {unit}; for severity means, the shifted mean, the worst set and several "
        f"seeds it is a percentile bootstrap ({data.n_boot} resamples) of the whole cell from the "
        "stored predictions, the same patients resampled in every seed and test set."
    )
    if multi:
        text += " Value = mean over seeds; SD = standard deviation over seeds (the seed spread)."
    return text


def _column_title(col: Column) -> str:
    return f"{col.name} (in-domain)" if col.in_domain else col.name


# ---- per test set: the headline metric ----


@register_panel("per-set", 10, help="the chosen metric per test set or severity, with CIs and n")
def per_set(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    metric = data.metric_for(conds)
    if metric not in data.metrics(conds):
        return None
    info = data.info(metric)
    cols = set_columns(conds)
    cells = {(c.key, col.name): data.cell(c, col, metric) for c in conds for col in cols}
    header = [
        "condition",
        "seeds",
        *[_column_title(col) for col in cols],
        "Δ shifted mean vs source",
    ]
    n_row = ["n (images / patients)", ""]
    n_row += [n_text([cells[(c.key, col.name)] for c in conds]) for col in cols] + [""]
    rows = [n_row]
    for c in conds:
        row = [c.label, str(len(c.records))]
        for col in cols:
            text = cells[(c.key, col.name)].text()
            row.append(
                f"{text} ({where})"
                if col.agg == "worst" and (where := _worst_set(c, col, metric, info))
                else text
            )
        base = baseline(c, conds)
        mine = cells.get((c.key, "shifted mean"))
        theirs = cells.get((base.key, "shifted mean")) if base else None
        if mine and theirs and not math.isnan(mine.value) and not math.isnan(theirs.value):
            row.append(f"{mine.value - theirs.value:+.3f} (vs {base.label})")
        else:
            row.append("-")
        rows.append(row)
    table = Table(f"{info.label} per test set", header, rows, ci_note(data, conds))
    corrupted = [col for col in cols if col.name.startswith("severity ")]
    fig = (
        severity_figure(data, section, conds) if corrupted else set_bars(data, section, conds, cols)
    )
    return Block(f"{info.label} per test set", [table], [fig] if fig else [])


def _worst_set(c: Condition, col: Column, metric: str, info) -> str:
    """The worst test set when every seed has the same one, else ''."""
    found = set()
    for r in c.records:
        vals = {s: (r["metrics"].get(s) or {}).get(metric) for s in col.sets}
        vals = {s: v for s, v in vals.items() if v is not None}
        if vals:
            found.add(info.worst(vals))
    return found.pop() if len(found) == 1 else ""


def set_bars(
    data: ReportData, section: str, conds: list[Condition], cols: list[Column]
) -> Figure | None:
    metric = data.metric_for(conds)
    info = data.info(metric)
    shown = [col for col in cols if col.name not in ("worst",)]
    if not shown:
        return None
    series, rows = [], []
    for c in conds:
        cells = [data.cell(c, col, metric) for col in shown]
        series.append(Series(c.label, data.styles[c.label], cells))
        rows += [
            data.figure_row("per-set", c, col.name, cell, metric=metric)
            for col, cell in zip(shown, cells, strict=True)
        ]
    xlabels = [
        f"{_column_title(col)}\n{n_text([data.cell(c, col, metric) for c in conds])}"
        for col in shown
    ]
    fig = bars([(section, xlabels, series)], info)
    return Figure(
        f"{slug(section)}_{metric}_per-set",
        f"{info.label} per test set — {section}",
        "Bars: value; whiskers: 95% CI (see the table note); dots: single seeds; n under each set.",
        fig,
        rows,
    )


def severity_figure(data: ReportData, section: str, conds: list[Condition]) -> Figure | None:
    """``metric`` against corruption severity (0 = the clean in-domain set): the mean over
    corruptions, then one panel per corruption; only the severities that ran are drawn."""
    metric = data.metric_for(conds)
    info = data.info(metric)
    names: list[str] = []
    sevs: set[int] = set()
    for c in conds:
        for s in c.sets:
            p = parse_set_name(s)
            if p:
                names += [p[0]] if p[0] not in names else []
                sevs.add(p[1])
    severities = sorted(sevs)
    has_clean = any(CLEAN in c.sets for c in conds)
    xs = ([0] if has_clean else []) + severities
    xticks = [(x, "clean" if x == 0 else str(x)) for x in xs]

    def columns(corruption: str | None) -> list[Column]:
        out = [Column(CLEAN, [CLEAN])] if has_clean else []
        for sev in severities:
            sets = [
                s
                for s in dict.fromkeys(s for c in conds for s in c.sets)
                if (p := parse_set_name(s)) and p[1] == sev and corruption in (None, p[0])
            ]
            out.append(Column(f"severity {sev}", sets))
        return out

    panels, rows = [], []
    for corruption in [None, *names[: MAX_PANELS - 1]]:
        title = "mean over corruptions" if corruption is None else corruption
        series = []
        for c in conds:
            cells = [data.cell(c, col, metric) for col in columns(corruption)]
            series.append(Series(c.label, data.styles[c.label], cells))
            rows += [
                data.figure_row("severity", c, str(x), cell, corruption=title, metric=metric)
                for x, cell in zip(xs, cells, strict=True)
            ]
        panels.append((title, xs, series))
    fig = curves(panels, xticks, "corruption severity (clean = no corruption)", info)
    return Figure(
        f"{slug(section)}_{metric}_severity",
        f"{info.label} against corruption severity — {section}",
        "Lines: value; bands: 95% CI (see the table note); dots: single seeds. "
        "Lines are offset sideways a little so that equal values stay visible.",
        fig,
        rows,
    )


# ---- binary tasks: the operating point ----


OP_METRICS = ("sensitivity", "specificity", "ppv", "npv")


def _rule(conds: list[Condition], test_set: str) -> str:
    ops = [((r.get("operating_point") or {}).get(test_set) or {}) for c in conds for r in c.records]
    ops = [o for o in ops if o.get("threshold") is not None]
    if not ops:
        return "-"
    ts = sorted(o["threshold"] for o in ops)
    where = sorted({str(o.get("chosen_on", "?")) for o in ops})
    t = f"{ts[0]:.3g}" if ts[0] == ts[-1] else f"{ts[0]:.3g}–{ts[-1]:.3g}"
    return f"score ≥ {t}, chosen on {'; '.join(where)}"


@register_panel(
    "operating-point",
    20,
    SINGLE_LABEL,
    help="binary tasks: sensitivity and specificity at the rule",
)
def operating_point(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    if not data.metrics(conds) & set(OP_METRICS):
        return None
    cols = [col for col in set_columns(conds) if col.agg == "mean"]
    header = [
        "condition",
        "test set",
        "n (images / patients)",
        "rule",
        "sensitivity",
        "specificity",
        "PPV",
        "NPV",
    ]
    rows, fig_rows, series = [], [], {m: [] for m in OP_METRICS[:2]}
    for c in conds:
        for col in cols:
            cells = {m: data.cell(c, col, m) for m in OP_METRICS}
            rule = _rule([c], col.sets[0]) if len(col.sets) == 1 else "each set's own rule"
            rows.append(
                [c.label, _column_title(col), n_text([cells["sensitivity"]]), rule]
                + [cells[m].text() for m in OP_METRICS]
            )
            fig_rows += [
                data.figure_row("operating-point", c, col.name, cells[m], metric=m)
                for m in OP_METRICS
            ]
        for m in series:
            series[m].append(
                Series(c.label, data.styles[c.label], [data.cell(c, col, m) for col in cols])
            )
    xlabels = [_column_title(col) for col in cols]
    fig = bars(
        [
            ("sensitivity", xlabels, series["sensitivity"]),
            ("specificity", xlabels, series["specificity"]),
        ],
        data.info("sensitivity"),
    )
    fig.axes[0].set_ylabel("at the operating point\n(higher is better)", fontsize=9)
    note = (
        "The operating point is a threshold on the positive-class probability, chosen once (on "
        "validation data where the run had it) and applied unchanged to every test set. "
        + ci_note(data, conds)
    )
    table = Table("sensitivity and specificity at the operating point", header, rows, note)
    figure = Figure(
        f"{slug(section)}_operating-point",
        f"sensitivity and specificity at the operating point — {section}",
        "Whiskers: 95% CI.",
        fig,
        fig_rows,
    )
    return Block("operating point (binary task)", [table], [figure])


# ---- subgroups ----


def subgroup_keys(conds: list[Condition]) -> dict[str, list[str]]:
    """Metadata keys with per-group metrics in the records, and their groups."""
    keys: dict[str, list[str]] = {}
    for c in conds:
        for r in c.records:
            for per_set in (r.get("subgroups") or {}).values():
                for key, info in per_set.items():
                    groups = keys.setdefault(key, [])
                    groups += [str(g) for g in info.get("groups", {}) if str(g) not in groups]
    return {k: sorted(v) for k, v in keys.items()}


@register_panel("subgroups", 40, help="the metric per patient subgroup, with CIs")
def subgroups(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    keys = subgroup_keys(conds)
    metric = data.metric_for(conds)
    has = data.frame[(data.frame["subgroup_key"].notna()) & (data.frame["metric"] == metric)]
    if not keys or has.empty:
        return None
    sets, which = shifted_sets(conds)
    col = Column(which, sets)
    info = data.info(metric)
    panels, rows = [], []
    for key, groups in keys.items():
        series = []
        for c in conds:
            cells = [data.cell(c, col, metric, group=(key, g)) for g in groups]
            series.append(Series(c.label, data.styles[c.label], cells))
            rows += [
                data.figure_row("subgroups", c, g, cell, key=key, metric=metric)
                for g, cell in zip(groups, cells, strict=True)
            ]
        xlabels = [
            f"{g}\n{n_text([data.cell(c, col, metric, group=(key, g)) for c in conds])}"
            for g in groups
        ]
        panels.append((key.replace("_", " "), xlabels, series))
    fig = bars(panels, info, f"\nmean over the {len(sets)} {which}")
    figure = Figure(
        f"{slug(section)}_{metric}_subgroups",
        f"{info.label} by subgroup — {section}",
        f"Each group's {info.label}, averaged over the {which}; whiskers: 95% patient-bootstrap "
        "CI of that average; n: images and patients of the group over those sets.",
        fig,
        rows,
    )
    return Block(f"{info.label} by subgroup", [], [figure])


# ---- test-time adaptation: what happened on the stream ----


def _trace(record: dict, test_set: str) -> dict[str, list]:
    return ((record.get("tta") or {}).get("trace") or {}).get(test_set) or {}


@register_panel("tta-trace", 70, CLASSIFICATION, help="entropy and resets along each TTA stream")
def tta_trace(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    traced = [c for c in conds if any(_trace(c.first, s).get("entropy") for s in c.sets)]
    if not traced:
        return None
    panels, rows = [], []
    for c in traced[:MAX_PANELS]:
        lines = []
        for s in c.sets:
            t = _trace(c.first, s)
            pos, ent = t.get("position") or [], t.get("entropy") or []
            if not ent:
                continue
            resets = [p for p, r in zip(pos, t.get("reset") or [], strict=False) if r]
            lines.append((s, pos, ent, resets))
            rows += [
                {
                    "panel": "tta-trace",
                    "section": section,
                    "condition": c.label,
                    "seed": c.first["config"]["seed"],
                    "test_set": s,
                    "position": p,
                    "entropy": e,
                    "reset": int(p in resets),
                }
                for p, e in zip(pos, ent, strict=False)
            ]
        panels.append((c.label, lines))
    fig = stream_traces(panels)
    figure = Figure(
        f"{slug(section)}_tta-trace",
        f"test-time adaptation along the stream — {section}",
        "Mean prediction entropy of each batch (divided by ln K: 1 = uniform) against the "
        "position in the stream, one line per test set (first seed); red ticks: resets to the "
        "source model. The whole trace is in <run id>.trace.csv next to each record.",
        fig,
        rows,
    )
    return Block("test-time adaptation along the stream", [], [figure])
