"""Segmentation in the report: CIs from the per-image tables, Dice by object size, the
fill-the-box baseline, the change against the unadapted source, and overlay pictures.

A segmentation run stores, per test set, a table of per-image, per-class scores
(``table/<set>/<field>`` in its predictions file). Every headline metric is a ratio of per-image
sums (:func:`clinadapt.evaluation.seg_metrics.image_parts`), so a resampled cell (patients drawn
jointly over the sets and seeds it combines) is ``sum(w * num) / sum(w * den)``. With the factory
registered here the generic panels (per test set, against corruption severity) draw segmentation
metrics with pooled CIs; the panels below add what only segmentation has.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from clinadapt.evaluation.bootstrap import percentile_ci
from clinadapt.evaluation.report.cells import POOLED_CI, Cell, resample_weights
from clinadapt.evaluation.report.conditions import Condition
from clinadapt.evaluation.report.data import Block, ReportData, Table, set_columns, shifted_sets
from clinadapt.evaluation.report.figures import Figure, pyplot, slug
from clinadapt.evaluation.report.panels import MAX_PANELS, ci_note, register_panel
from clinadapt.evaluation.report.plots import Series, bars
from clinadapt.evaluation.report.predictions import SetPredictions
from clinadapt.evaluation.report.statistics import Replicates, register
from clinadapt.evaluation.seg_metrics import (
    SIZE_EDGES_MM,
    SegTable,
    image_parts,
    size_bin_names,
    table_from_arrays,
)

SEGMENTATION = frozenset({"segmentation"})
FILL_BOX = "fill-box"
RATIO_METRICS = ("dice", "dice_present", "iou", "nsd", "hd95", "hd95_missing", "false_detection")


def class_names(record: dict[str, Any]) -> list[str]:
    return [str(c) for c in (record.get("data") or {}).get("class_names") or []]


def set_table(pred: SetPredictions, record: dict[str, Any]) -> SegTable:
    """The per-image table of one test set, from its stored arrays."""
    arrays = {f"table/-/{k}": v for k, v in pred.tables.items()}
    return table_from_arrays(arrays, "-", class_names(record))


def ratio(num: np.ndarray, den: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum(w * num) / sum(w * den)`` per row of weights; NaN where nothing is counted."""
    w = np.asarray(weights, dtype=np.float64)
    top, bottom = w @ num, w @ den
    return np.divide(top, bottom, out=np.full(len(w), np.nan), where=bottom > 0)


def segmentation_replicates(
    metric: str, task: str, record: dict[str, Any], test_set: str
) -> Replicates | None:
    """Replicates of a segmentation metric (``dice``, ``dice_present``, ``nsd``, ``hd95``,
    ``dice/<class>``, ...) from the stored per-image table, as :func:`image_parts` defines it."""
    name, _, cls = metric.partition("/")
    if name not in RATIO_METRICS or (cls and cls not in class_names(record)):
        return None

    def rep(pred: SetPredictions, weights: np.ndarray) -> np.ndarray:
        if not pred.tables:
            return np.full(len(weights), np.nan)
        num, den = image_parts(set_table(pred, record), metric)
        return ratio(num, den, weights)

    return rep


register("segmentation", segmentation_replicates)


# ---- cells from per-image parts (pairs pooled over a cell's test sets) ----

Parts = tuple[SetPredictions, np.ndarray, np.ndarray]  # predictions, numerators, denominators


def pooled_cell(data: ReportData, per_seed: list[list[Parts]], n_sets: int) -> Cell:
    """One cell from per-image (num, den) of each seed's sets: per seed the ratio over all their
    rows, the mean over seeds; the CI resamples patients jointly over every member."""
    values = [
        sum(float(n.sum()) for _, n, _ in parts) / den
        for parts in per_seed
        if (den := sum(float(d.sum()) for _, _, d in parts)) > 0
    ]
    if not values:
        return Cell(math.nan)
    flat = [m for parts in per_seed for m in parts]
    weights = resample_weights([p for p, _, _ in flat], data.n_boot, np.random.default_rng(0))
    tops, bottoms = [], []
    for (_, num, den), w in zip(flat, weights, strict=True):
        w = np.asarray(w, np.float64)
        tops.append(w @ num)
        bottoms.append(w @ den)
    reps, k = [], 0
    for parts in per_seed:
        top = np.sum(tops[k : k + len(parts)], 0)
        bottom = np.sum(bottoms[k : k + len(parts)], 0)
        k += len(parts)
        reps.append(np.divide(top, bottom, out=np.full(len(top), np.nan), where=bottom > 0))
    with np.errstate(all="ignore"):
        rows = np.stack(reps, 1)
        ok = ~np.isnan(rows)
        mean = np.where(ok, rows, 0).sum(1) / np.maximum(ok.sum(1), 1)
        mean[ok.sum(1) == 0] = np.nan
    ci = percentile_ci({"cell": mean}, data.alpha)["cell"]
    low, high = (ci["low"], ci["high"]) if ci["n_boot"] >= 2 else (math.nan, math.nan)
    objects = [sum(float(d.sum()) for _, _, d in parts) for parts in per_seed]
    patients = [_patients(parts) for parts in per_seed]
    return Cell(
        float(np.mean(values)),
        tuple(values),
        low,
        high,
        POOLED_CI if not math.isnan(low) else "",
        float(np.mean(objects)),
        float(np.mean(patients)) if not any(math.isnan(p) for p in patients) else math.nan,
        n_sets,
    )


def _patients(parts: list[Parts]) -> float:
    """Distinct patients with at least one counted row."""
    ids: set = set()
    for p, _, d in parts:
        if p.patients is None:
            return math.nan
        ids.update(p.patients[d > 0].tolist())
    return float(len(ids))


# ---- Dice by object size ----


def size_edges(conds: list[Condition]) -> list[float] | None:
    """The size-bin edges (mm) the section's runs used; None when they differ."""
    found = {
        tuple(
            float(e)
            for e in (r["config"].get("evaluation") or {}).get("size_edges_mm", SIZE_EDGES_MM)
        )
        for c in conds
        for r in c.records
    }
    return list(found.pop()) if len(found) == 1 else None


def bin_parts(table: SegTable, cls: str, bin_name: str, edges: list[float]):
    """(num, den) per image: Dice of ``cls`` over its pairs whose reference falls in the bin."""
    c = table.class_names.index(cls)
    which = np.digitize(table.ref_diameter_mm()[:, c], edges)
    inside = table.ref_present[:, c] & (which == size_bin_names(edges).index(bin_name))
    return np.where(inside, table.dice[:, c], 0.0), inside.astype(np.float64)


def size_cell(
    data: ReportData, cond: Condition, sets: list[str], cls: str, bin_name: str, edges: list[float]
) -> Cell:
    """Dice of ``cls`` on the objects of one size bin over ``sets``; n = objects in the bin."""
    per_seed = []
    for r in cond.records:
        parts = []
        for s in sets:
            pred = data.predictions.get(r, s)
            if pred is None or not pred.tables or cls not in class_names(r):
                continue
            parts.append((pred, *bin_parts(set_table(pred, r), cls, bin_name, edges)))
        if parts:
            per_seed.append(parts)
    return pooled_cell(data, per_seed, len(sets)) if per_seed else Cell(math.nan)


def _objects(cells: list[Cell]) -> str:
    vals = sorted({round(c.n_images) for c in cells if not math.isnan(c.n_images)})
    if not vals:  # no object of that size in the sets
        return "n 0"
    return f"n {vals[0]}" if len(vals) == 1 else f"n {vals[0]}–{vals[-1]}"


@register_panel(
    "seg-size-bins", 30, SEGMENTATION, help="Dice per class and object size, with CIs and n"
)
def size_bins(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    edges = size_edges(conds)
    names = sorted({n for c in conds for n in class_names(c.first)})
    if edges is None or not names:
        return None
    classes = [n for n in class_names(conds[0].first) if n in names]
    bins = size_bin_names(edges)
    cols = [col for col in set_columns(conds) if col.agg == "mean"]
    header = ["condition", "class", "object size", *[col.name for col in cols]]
    rows, panels, fig_rows = [], [], []
    sets, which = shifted_sets(conds)
    for cls in classes:
        series = []
        for c in conds:
            cells = []
            for b in bins:
                row = [c.label, cls, b]
                for col in cols:
                    cell = size_cell(data, c, col.sets, cls, b, edges)
                    row.append(
                        "-" if math.isnan(cell.value) else f"{cell.text()} [{_objects([cell])}]"
                    )
                if any(v != "-" for v in row[3:]):  # a size no set of this condition holds
                    rows.append(row)
                cell = size_cell(data, c, sets, cls, b, edges)
                cells.append(cell)
                fig_rows.append(
                    data.figure_row("seg-size-bins", c, b, cell, metric=f"dice/{cls}", sets=which)
                )
            series.append(Series(c.label, data.styles[c.label], cells))
        if any(not math.isnan(cell.value) for s in series for cell in s.cells):
            xlabels = [f"{b}\n{_objects([s.cells[i] for s in series])}" for i, b in enumerate(bins)]
            panels.append((cls, xlabels, series))
    if not panels:
        return None
    note = (
        "Dice of the objects whose reference area equals a disc of that diameter, pooled over "
        "the objects of the set(s); n = objects. " + ci_note(data, conds)
    )
    table = Table("Dice by object size", header, rows, note)
    fig = bars(panels[:MAX_PANELS], data.info("dice"), f"\nover the {len(sets)} {which}")
    figure = Figure(
        f"{slug(section)}_dice_size-bins",
        f"Dice by object size — {section}",
        f"Each class's Dice on objects of each size, pooled over the {which}; whiskers: 95% "
        "patient-bootstrap CI; n: objects.",
        fig,
        fig_rows,
    )
    return Block("Dice by object size", [table], [figure])


# ---- the fill-the-box baseline and the change against the source ----


def _fill_box(record: dict, test_set: str, metric: str) -> tuple[float, float, float]:
    """(value, low, high) of the fill-the-box baseline of ``test_set`` for ``metric``."""
    part = ((record.get("baselines") or {}).get(test_set) or {}).get(FILL_BOX) or {}
    v = (part.get("metrics") or {}).get(metric)
    ci = (part.get("ci") or {}).get(metric) or {}
    if v is None:
        return math.nan, math.nan, math.nan
    return float(v), float(ci.get("low", math.nan)), float(ci.get("high", math.nan))


def _change(vs: dict[str, Any]) -> str:
    """``+0.012 (-0.004–0.030)``: the change and, where the record has it, its paired CI."""
    text = f"{vs['change']:+.3f}"
    if "low" in vs and "high" in vs:
        text += f", CI {vs['low']:+.3f}–{vs['high']:+.3f}"
    return text


def _fmt(value: float, low: float = math.nan, high: float = math.nan) -> str:
    if math.isnan(value):
        return "-"
    if math.isnan(low) or math.isnan(high):
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}–{high:.3f})"


@register_panel(
    "seg-baselines",
    20,
    SEGMENTATION,
    help="fill-the-box baseline on the same boxes; test-time methods against their source",
)
def baselines(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    metric = data.metric_for(conds)
    info = data.info(metric)
    sets = list(dict.fromkeys(s for c in conds for s in c.sets))
    tables = []
    boxed = [c for c in conds if any((r.get("baselines") or {}) for r in c.records)]
    if boxed:
        rows = []
        for c in boxed:
            for r in c.records:
                seed = r["config"]["seed"]
                row = [c.label, str(seed)]
                for s in sets:
                    mine = (r.get("metrics") or {}).get(s, {}).get(metric)
                    ci = ((r.get("ci") or {}).get(s) or {}).get(metric) or {}
                    own = _fmt(
                        math.nan if mine is None else float(mine),
                        float(ci.get("low", math.nan)),
                        float(ci.get("high", math.nan)),
                    )
                    row.append(f"{own} vs {_fmt(*_fill_box(r, s, metric))}")
                rows.append(row)
        tables.append(
            Table(
                f"{info.label}: the method vs filling its box prompts",
                ["condition", "seed", *sets],
                rows,
                "Each cell: the method's value, then the value of filling each jittered box "
                "prompt as the mask (same boxes, same images), each with its record's 95% "
                "patient-bootstrap CI. A box-prompted method is only as good as its margin over "
                "the box itself.",
            )
        )
    adapted = [c for c in conds if any(r.get("vs_source") for r in c.records)]
    if adapted:
        rows = []
        for c in adapted:
            for r in c.records:
                row = [c.label, str(r["config"]["seed"])]
                for s in sets:
                    vs = ((r.get("vs_source") or {}).get(s) or {}).get(metric)
                    if not vs:
                        row.append("-")
                        continue
                    row.append(f"{vs['source']:.3f} → {vs['adapted']:.3f} ({_change(vs)})")
                rows.append(row)
        tables.append(
            Table(
                f"{info.label}: test-time adaptation against its unadapted source",
                ["condition", "seed", *sets],
                rows,
                "Each cell: the source model, then the adapted one, on the same stream; in "
                "brackets the change with the 95% CI of a paired patient bootstrap (both models "
                "on the same resampled patients) where the record has one.",
            )
        )
    if not tables:
        return None
    return Block("baselines and change against the source", tables)


# ---- overlay pictures ----


def read_case_arrays(data: ReportData, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ``cases/...`` arrays of a run's predictions file (empty if it was not kept)."""
    path = data.runs_dir / "predictions" / f"{record['run_id']}.npz"
    if not path.exists():
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k.startswith("cases/")}


@register_panel(
    "seg-overlays",
    60,
    SEGMENTATION,
    help="best, median and worst case per test set: image, reference and predicted contours, prompt",
)
def overlays(data: ReportData, section: str, conds: list[Condition]) -> Block | None:
    from clinadapt.evaluation.seg_overlays import overlay_figure, read_cases

    figures = []
    for c in conds[:MAX_PANELS]:
        r = c.first
        arrays = read_case_arrays(data, r)
        cases, dice = {}, {}
        for s in c.sets:
            if f"cases/{s}/best/image" not in arrays:
                continue
            cases[s] = read_cases(arrays, s)
            dice[s] = {
                rank: info.get("dice")
                for rank, info in ((r.get("cases") or {}).get(s) or {}).items()
            }
        if not cases:
            continue
        pyplot()  # the Agg backend before drawing
        fig = overlay_figure(cases, class_names(r), dice)
        rows = [
            {
                "panel": "seg-overlays",
                "section": section,
                "condition": c.label,
                "seed": r["config"]["seed"],
                "test_set": s,
                "rank": rank,
                "position": int(case["position"]),
                "dice": dice[s].get(rank),
            }
            for s, per in cases.items()
            for rank, case in per.items()
        ]
        figures.append(
            Figure(
                f"{slug(section)}_{slug(c.label)}_overlays",
                f"best, median and worst case per test set — {c.label}, seed {r['config']['seed']}",
                "Image with the reference contour (solid) and the predicted contour (dashed), one "
                "colour per class; the prompt in yellow (box; + positive, x negative point). "
                "Ranked by the image's mean Dice over its classes; images with nothing in the "
                "reference or the prediction are left out of the ranking.",
                fig,
                rows,
            )
        )
    if not figures:
        return None
    return Block("cases: best, median and worst", [], figures)
