"""Segmentation in the report: built from real tiny runs (tiny SAM, built-in data)."""

import numpy as np
import pytest

from clinadapt.config import load_config
from clinadapt.evaluation.report import write_report
from clinadapt.evaluation.report.predictions import read_predictions
from clinadapt.evaluation.report.segmentation import (
    segmentation_replicates,
    set_table,
    size_edges,
)
from clinadapt.evaluation.report.statistics import replicates
from clinadapt.evaluation.seg_metrics import summarise_table
from clinadapt.runner import run_experiment

SMALL = {
    "shift": "domain",
    "shift_options": {"source": "site-a", "target_split": "test"},
    "data_options": {"patients_per_site": 10},
    "evaluation": {"n_boot": 20},
    "batch_size": 8,
}


def zeroshot(out, kind: str) -> dict:
    cfg = load_config(None, method="seg-zeroshot", out_dir=str(out), prompt={"kind": kind}, **SMALL)
    return run_experiment(cfg)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    out = tmp_path_factory.mktemp("segbox")
    return out, zeroshot(out, "box")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("segreport")
    recs = {kind: zeroshot(out, kind) for kind in ("box", "points")}
    cfg = load_config(
        None,
        method="seg-tent",
        out_dir=str(out),
        source={"method": "seg-zeroshot"},
        **SMALL,
    )
    recs["tent"] = run_experiment(cfg)
    cfg = load_config(
        None,
        method="seg-zeroshot",
        out_dir=str(out),
        **{
            **SMALL,
            "shift": "corruption",
            "shift_options": {
                "source": "site-a",
                "severities": [1, 5],
                "corruptions": ["blur", "gaussian-noise"],
            },
        },
    )
    recs["corruption"] = run_experiment(cfg)
    return out, recs


def test_replicates_of_every_metric_reproduce_the_record_and_a_resample(box):
    out, rec = box
    preds = read_predictions(out / "predictions" / f"{rec['run_id']}.npz")
    assert set(preds) == set(rec["metrics"])
    pred = preds["site-b"]
    assert len(pred) == rec["counts"]["site-b"]["images"]
    for metric in ("dice", "dice_present", "nsd", "hd95", "dice/lesion", "iou"):
        rep = replicates(metric, "segmentation", rec, "site-b")
        assert rep is not None, metric
        ones = rep(pred, np.ones((1, len(pred))))[0]
        assert ones == pytest.approx(rec["metrics"]["site-b"][metric]), metric
        # a resample drawing image 0 three times and dropping image 1: the metric of that
        # list of images, computed by the record's own summary of the per-image table
        w = np.ones(len(pred))
        w[0], w[1] = 3, 0
        rows = np.repeat(np.arange(len(pred)), w.astype(int))
        by_hand = summarise_table(set_table(pred, rec).take(rows))[metric]
        assert rep(pred, w[None])[0] == pytest.approx(by_hand), metric
    assert segmentation_replicates("accuracy", "segmentation", rec, "site-b") is None
    assert segmentation_replicates("dice/kidney", "segmentation", rec, "site-b") is None


@pytest.mark.slow
def test_the_report_draws_segmentation_with_cis_cases_sizes_and_baselines(runs):
    out, recs = runs
    files = write_report(out, formats=("png",))
    html = files.html.read_text()
    md = files.markdown.read_text()
    names = {f.name for f in files.figures}
    assert any(n.endswith("_dice_present_per-set") for n in names)
    assert any(n.endswith("_overlays") for n in names)
    assert any(n.endswith("_dice_size-bins") for n in names)
    assert "Dice by object size" in md and "cases: best, median and worst" in md
    assert "vs filling its box prompts" in md and "against its unadapted source" in md
    # conditions that differ only by their prompt are told apart
    assert "kind=box" in md and "kind=points" in md
    # pooled CIs: the shifted mean of a condition has an interval from the per-image tables
    import pandas as pd

    rows = pd.read_csv(next(f.files["csv"] for f in files.figures if f.name.endswith("per-set")))
    shifted = rows[rows["x"] == "shifted mean"]
    assert len(shifted) and (shifted["ci"] == "pooled").all()
    assert (shifted["ci_low"] <= shifted["value"]).all() and (
        shifted["value"] <= shifted["ci_high"]
    ).all()
    assert "<img" in html
    # Dice against corruption severity, the mean over corruptions with pooled CIs
    sev = next(f for f in files.figures if f.name.endswith("_severity"))
    rows = pd.read_csv(sev.files["csv"])
    mean = rows[(rows["corruption"] == "mean over corruptions") & (rows["x"].astype(str) != "0")]
    assert set(mean["x"].astype(str)) == {"1", "5"} and (mean["ci"] == "pooled").all()
    rec = recs["corruption"]
    for x, value in zip(mean["x"].astype(str), mean["value"], strict=True):
        sets = [s for s in rec["metrics"] if s.endswith(f"@{x}")]
        assert sets, list(rec["metrics"])
        assert value == pytest.approx(np.mean([rec["metrics"][s]["dice_present"] for s in sets]))


def test_size_bin_cell_matches_the_record_for_one_set(box):
    out, rec = box
    from clinadapt.evaluation.report.data import ReportData
    from clinadapt.evaluation.report.segmentation import size_cell

    data = ReportData(out, [rec], "dice", 50, 0.05)
    (cond,) = data.conditions
    edges = size_edges([cond])
    for bin_name, per in rec["size_bins"]["site-c"]["lung"].items():
        if bin_name == "empty":
            continue
        cell = size_cell(data, cond, ["site-c"], "lung", bin_name, edges)
        assert cell.value == pytest.approx(per["dice"]) and cell.n_images == per["n"]
        assert cell.low <= cell.value <= cell.high
