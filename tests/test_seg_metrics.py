"""Segmentation metrics against hand values and MONAI, the empty-mask conventions, sizes and CIs."""

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)

from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.seg_evaluate import evaluate_segmentation
from clinadapt.evaluation.seg_metrics import (
    one_hot,
    score_image,
    score_images,
    size_bin_names,
    size_bins,
    summarise_table,
    surface_scores,
)
from clinadapt.evaluation.subgroups import lower_is_better


def box(h, w, r0, c0, r1, c1):
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def monai_values(pred, ref, spacing, tol):
    """Dice, IoU, NSD, HD95 of one binary pair by MONAI's own metric functions."""
    p = torch.stack([torch.as_tensor(~pred), torch.as_tensor(pred)])[None].float()
    r = torch.stack([torch.as_tensor(~ref), torch.as_tensor(ref)])[None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (
            float(compute_dice(p, r, include_background=False, ignore_empty=False)),
            float(compute_iou(p, r, include_background=False, ignore_empty=False)),
            float(compute_surface_dice(p, r, [tol], spacing=list(spacing))),
            float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))),
        )


def test_hand_values_on_small_masks():
    ref = box(10, 10, 2, 2, 6, 6)  # 16 pixels
    pred = box(10, 10, 3, 2, 7, 6)  # shifted down one row: 12 shared
    v = score_image(pred.astype(np.uint8), ref.astype(np.uint8), 1)
    assert v["dice"][0] == pytest.approx(2 * 12 / 32)
    assert v["iou"][0] == pytest.approx(12 / 20)
    assert v["ref_area"][0] == 16 and v["pred_area"][0] == 16
    # boundaries: 12 edge pixels each; every edge pixel is within one pixel of the other edge
    assert v["nsd"][0] == pytest.approx(1.0)
    assert v["hd95"][0] == pytest.approx(1.0)
    # spacing 0.5 mm per row: the one-row shift is 0.5 mm, under a 0.4 mm tolerance it is not
    nsd, hd = surface_scores(pred, ref, (0.5, 2.0), 0.4)
    assert hd == pytest.approx(0.5)
    # each boundary has 12 pixels; only the side pixels of the 3 shared rows (6) coincide
    assert nsd == pytest.approx(12 / 24)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.9)])
def test_agrees_with_monai(seed, spacing):
    rng = np.random.default_rng(seed)
    ref = np.zeros((40, 36), bool)
    pred = np.zeros((40, 36), bool)
    for m in (ref, pred):
        for _ in range(rng.integers(1, 4)):
            r0, c0 = rng.integers(0, 30, 2)
            m[r0 : r0 + rng.integers(2, 12), c0 : c0 + rng.integers(2, 12)] = True
    tol = 1.5
    v = score_image(np.stack([pred]), np.stack([ref]), 1, spacing, tol)
    d, i, nsd, hd = monai_values(pred, ref, spacing, tol)
    assert v["dice"][0] == pytest.approx(d, abs=1e-6)
    assert v["iou"][0] == pytest.approx(i, abs=1e-6)
    assert v["nsd"][0] == pytest.approx(nsd, abs=1e-5)
    assert v["hd95"][0] == pytest.approx(hd, abs=1e-4)


def test_empty_mask_conventions():
    empty = np.zeros((8, 8), np.uint8)
    obj = box(8, 8, 1, 1, 4, 4).astype(np.uint8)
    both = score_image(empty, empty, 1)
    assert (both["dice"][0], both["iou"][0], both["nsd"][0]) == (1.0, 1.0, 1.0)
    assert math.isnan(both["hd95"][0])
    missed = score_image(empty, obj, 1)  # empty prediction of a non-empty object
    assert (missed["dice"][0], missed["iou"][0], missed["nsd"][0]) == (0.0, 0.0, 0.0)
    assert math.isnan(missed["hd95"][0])
    false = score_image(obj, empty, 1)  # something predicted on an empty image
    assert false["dice"][0] == 0.0 and math.isnan(false["hd95"][0])
    table = score_images([empty, empty, obj, obj], [empty, obj, empty, obj], np.ones((4, 2)), ["x"])
    assert table.hd95_missing[:, 0].tolist() == [False, True, True, False]
    s = summarise_table(table)
    assert s["dice"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert s["dice_present"] == pytest.approx((0 + 1) / 2)  # only where the reference has it
    assert s["hd95"] == 0.0  # only the defined pair (a perfect match)
    assert s["hd95_missing"] == pytest.approx(2 / 3)  # of the pairs with any object
    assert s["false_detection"] == pytest.approx(1 / 2)  # of the empty references


def test_multiclass_label_maps_and_overlapping_masks():
    ref = np.zeros((10, 10), np.uint8)
    ref[1:5, 1:5] = 1
    ref[6:9, 6:9] = 2
    pred = ref.copy()
    pred[6:9, 6:9] = 0  # class 2 missed
    v = score_image(pred, ref, 2)
    assert v["dice"].tolist() == [1.0, 0.0] and v["ref_area"].tolist() == [16, 9]
    # (C,H,W) booleans may overlap
    stacked = np.stack([ref == 1, (ref == 1) | (ref == 2)])
    w = score_image(stacked, np.stack([ref == 1, ref == 2]), 2)
    assert w["dice"][0] == 1.0 and w["dice"][1] == pytest.approx(2 * 9 / (25 + 9))
    s = summarise_table(score_images([pred], [ref], np.ones((1, 2)), ["organ", "tumour"]))
    assert s["dice/organ"] == 1.0 and s["dice/tumour"] == 0.0 and s["dice"] == 0.5
    with pytest.raises(DataError, match="C = 2"):
        one_hot(np.zeros((3, 4, 4)), 2)
    with pytest.raises(DataError, match="differ in size"):
        score_image(np.zeros((4, 4)), np.zeros((4, 5)), 1)


def test_size_bins_by_equivalent_diameter_in_mm():
    assert size_bin_names((10, 30)) == ["<10 mm", "10-30 mm", ">=30 mm"]
    # areas of 25, 400 and 2500 pixels at 1 mm: diameters 5.6, 22.6 and 56.4 mm
    refs = [box(60, 60, 0, 0, 5, 5), box(60, 60, 0, 0, 20, 20), box(60, 60, 0, 0, 50, 50)]
    refs = [r.astype(np.uint8) for r in refs] + [np.zeros((60, 60), np.uint8)]
    preds = [r.copy() for r in refs]
    preds[0][:] = 0  # the small one missed
    preds[3][0, 0] = 1  # a false detection on the empty image
    table = score_images(preds, refs, np.ones((4, 2)), ["lesion"])
    bins = size_bins(table, (10, 30))["lesion"]
    assert bins["<10 mm"] == {
        "n": 1,
        "dice": 0.0,
        "iou": 0.0,
        "nsd": 0.0,
        "hd95": pytest.approx(math.nan, nan_ok=True),
        "hd95_missing": 1.0,
    }
    assert bins["10-30 mm"]["dice"] == 1.0 and bins[">=30 mm"]["n"] == 1
    assert bins["empty"] == {"n": 1, "false_detection": 1.0}
    # spacing moves a pair between bins: 25 pixels at 3 mm = 225 mm^2, diameter 16.9 mm
    coarse = score_images(preds, refs, np.full((4, 2), 3.0), ["lesion"])
    assert size_bins(coarse, (10, 30))["lesion"]["10-30 mm"]["n"] == 1


def test_evaluate_subgroups_patient_bootstrap_and_warnings():
    rng = np.random.default_rng(0)
    refs, preds = [], []
    for i in range(24):
        ref = box(20, 20, 5, 5, 12, 12).astype(np.uint8)
        shift = 0 if i < 12 else 3  # site b is segmented worse
        refs.append(ref)
        preds.append(np.roll(ref, shift + rng.integers(0, 2), axis=1))
    table = score_images(preds, refs, np.ones((24, 2)), ["lesion"])
    meta = {
        "domain": np.array(["a"] * 12 + ["b"] * 12),
        "patient_id": np.repeat(np.arange(8), 3).astype(str),
    }
    out = evaluate_segmentation(table, meta, n_boot=50, seed=1, nsd_tolerance_mm=2.0)
    g = out["subgroups"]["domain"]
    assert g["groups"]["a"]["dice"] > g["groups"]["b"]["dice"]
    assert g["worst"]["dice"]["group"] == "b" and g["worst"]["hd95"]["group"] == "b"
    assert g["gap"]["dice"] == pytest.approx(g["groups"]["a"]["dice"] - g["groups"]["b"]["dice"])
    assert out["ci"]["unit"] == "patient" and out["ci"]["dice"]["n_boot"] == 50
    assert out["ci"]["dice"]["low"] <= out["metrics"]["dice"] <= out["ci"]["dice"]["high"]
    assert "warnings" not in out
    fine = evaluate_segmentation(table, meta, n_boot=0, nsd_tolerance_mm=0.5)
    assert "ci" not in fine and "finer than the pixels" in fine["warnings"][0]
    # the same again from a hand-built resample: the statistic weighs repeated rows
    with pytest.raises(ConfigError, match="unknown segmentation metric"):
        evaluate_segmentation(table, meta, ci_metrics=["accuracy"])


def test_directions():
    assert lower_is_better("hd95") and lower_is_better("hd95/lesion")
    assert not lower_is_better("dice/lesion") and lower_is_better("false_detection")


def test_image_parts_reproduce_every_headline_metric():
    from clinadapt.evaluation.seg_metrics import image_parts, table_from_arrays

    rng = np.random.default_rng(3)
    refs, preds = [], []
    for _ in range(9):
        ref = np.zeros((12, 12), np.uint8)
        pred = np.zeros((12, 12), np.uint8)
        for m in (ref, pred):
            if rng.random() < 0.7:
                r, c = rng.integers(0, 8, 2)
                m[r : r + 4, c : c + 4] = rng.integers(1, 3)
        refs.append(ref)
        preds.append(pred)
    table = score_images(preds, refs, np.ones((9, 2)), ["organ", "lesion"])
    s = summarise_table(table)
    rows = np.array([0, 0, 3, 5, 8, 8, 8])  # a resample with repeats
    sub = summarise_table(table.take(rows))
    for metric in s:
        num, den = image_parts(table, metric)
        for value, idx in ((s[metric], slice(None)), (sub[metric], rows)):
            got = num[idx].sum() / den[idx].sum() if den[idx].sum() else math.nan
            assert got == pytest.approx(value, nan_ok=True), metric
    arrays = {
        f"table/t/{f}": getattr(table, f)
        for f in ("dice", "iou", "nsd", "hd95", "ref_area", "pred_area", "spacing")
    }
    again = table_from_arrays(arrays, "t", ["organ", "lesion"])
    assert summarise_table(again) == pytest.approx(s, nan_ok=True)
    with pytest.raises(DataError, match="no per-image table of 'u'"):
        table_from_arrays(arrays, "u", ["organ", "lesion"])
    with pytest.raises(DataError, match="unknown segmentation metric"):
        image_parts(table, "accuracy")


def test_against_source_pairs_the_same_images():
    from clinadapt.evaluation.seg_evaluate import against_source

    refs = [box(10, 10, 2, 2, 6, 6).astype(np.uint8) for _ in range(6)]
    good = [r.copy() for r in refs]
    worse = [np.roll(r, 2, axis=1) for r in refs]
    ones = np.ones((6, 2))
    adapted = score_images(worse, refs, ones, ["x"])
    source = score_images(good, refs, ones, ["x"])
    meta = {"patient_id": np.array(["a", "a", "b", "b", "c", "c"])}
    out = against_source("t", adapted, source, meta, n_boot=30, seed=0)
    vs = out["vs_source"]["dice"]
    assert vs["source"] == 1.0 and vs["adapted"] == pytest.approx(2 * 8 / 32)
    assert vs["change"] == pytest.approx(vs["adapted"] - 1.0)
    assert vs["low"] == vs["high"] == pytest.approx(vs["change"])  # the same on every resample
    assert out["vs_source"]["hd95"]["change"] == pytest.approx(2.0)  # lower is better: worse
    (d,) = [d for d in out["degraded"] if d["metric"] == "dice"]
    assert d["set"] == "t" and d["significant"]
    assert out["source_metrics"]["dice"] == 1.0


def test_metric_changes_skips_what_either_model_lacks():
    from clinadapt.evaluation.compare import metric_changes

    out = metric_changes(
        {"dice": 0.5, "hd95": float("nan"), "nsd": 0.7},
        {"dice": 0.75, "hd95": 3.0},
        ["dice", "hd95", "nsd"],
    )
    assert out == {"dice": {"source": 0.75, "adapted": 0.5, "change": -0.25}}
