"""Report-wide tables: the conditions and what each is, and one row per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clinadapt.evaluation.labels import run_label, target_label
from clinadapt.evaluation.metric_info import metric_info
from clinadapt.evaluation.report.cells import CellMaker
from clinadapt.evaluation.report.conditions import Condition, group_conditions
from clinadapt.evaluation.report.data import Table, set_columns
from clinadapt.evaluation.report.predictions import PredictionStore
from clinadapt.evaluation.tidy import records_frame


def _options(record: dict[str, Any]) -> str:
    cfg = record["config"]
    parts = []
    if cfg.get("method_options"):
        parts.append(f"{cfg['method']}: {json.dumps(cfg['method_options'], sort_keys=True)}")
    src = record.get("source") or {}
    if src.get("options"):
        parts.append(f"source {src.get('method')}: {json.dumps(src['options'], sort_keys=True)}")
    return "; ".join(parts) or "defaults"


def conditions_table(conditions: list[Condition]) -> Table:
    """Each condition's full identity: the label used everywhere, and what it stands for."""
    header = [
        "condition",
        "section",
        "model",
        "target",
        "method",
        "options",
        "seed(s)",
        "trainable",
    ]
    rows = []
    for c in conditions:
        r = c.first
        if c.method == "source":
            what = f"{c.chain}, evaluated unchanged (method 'source')"
        elif c.is_tta:
            what = f"{c.chain} (test-time adaptation of the {r['source'].get('method')} model)"
        else:
            what = c.chain
        tgt = r.get("target") or {}
        trainable = (
            f"{tgt['trainable']:,} of {tgt['total']:,}"
            if "trainable" in tgt and "total" in tgt
            else "-"
        )
        rows.append(
            [
                c.label,
                c.section,
                r["config"]["model"],
                target_label(r),
                what,
                _options(r),
                ", ".join(map(str, c.seeds)),
                trainable,
            ]
        )
    note = (
        "A condition is named after the model it evaluates: 'finetune' is the fine-tuned model as "
        "it is (also when a run used the 'source' test-time method, which adapts nothing); "
        "'finetune → tent' is that model adapted by tent on each test stream. Model or target are "
        "added to the name only where conditions differ in them."
    )
    return Table("conditions", header, rows, note)


def results_table(
    records: list[dict[str, Any]],
    metric: str = "balanced_accuracy",
    runs_dir: str | Path | None = None,
    ci: bool = False,
    maker: CellMaker | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run, one column per test set (corruption runs: per severity,
    averaged over corruptions), then the shifted mean and the worst set; with ``ci``, each value
    with its 95% CI (severity means and the shifted mean need the stored predictions)."""
    conditions = group_conditions(records)
    if maker is None:
        maker = CellMaker(records_frame(records), PredictionStore(runs_dir))
    single = {c.first.get("run_id"): c for c in conditions if len(c.records) == 1}
    cols = set_columns(conditions)
    in_dom = {s for r in records for s in (r.get("shift") or {}).get("in_domain", [])}
    header = ["run", *[f"{c.name} (in-domain)" if c.name in in_dom else c.name for c in cols]]
    rows = []
    for r in records:
        one = single.get(r.get("run_id")) or Condition(f"run:{r.get('run_id')}", "", "", "", [r])
        row = [run_label(r)]
        for col in cols:
            sets = [s for s in col.sets if s in r.get("metrics", {})]
            cell = maker.cell(one, sets, metric, col.agg) if sets else None
            if cell is None or cell.value != cell.value:
                row.append("-")
            elif col.agg == "worst":
                vals = {s: r["metrics"][s].get(metric) for s in sets}
                vals = {s: v for s, v in vals.items() if v is not None}
                worst = metric_info(metric).worst(vals) if vals else ""
                row.append(f"{cell.text(sd=False) if ci else f'{cell.value:.3f}'} ({worst})")
            else:
                row.append(cell.text(sd=False) if ci else f"{cell.value:.3f}")
        rows.append(row)
    return header, rows
