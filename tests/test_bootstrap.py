"""Vectorised bootstrap: every replicate equals the metric on the resampled data, and the CIs
equal those of the plain loop over resamples (written out here, independently)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.bootstrap import (
    bootstrap_ci,
    draw_counts,
    iter_resample_weights,
    paired_bootstrap_ci,
    percentile_ci,
    resample_weights,
)
from clinadapt.evaluation.evaluate import evaluate
from clinadapt.evaluation.metrics import compute_metrics, operating_point
from clinadapt.evaluation.replicates import headline_names, replicate_metrics
from clinadapt.evaluation.selective import aurc, coverage_at_risk


def _data(task, n=90, k=3, seed=0):
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        y = rng.integers(0, 2, (n, k))
        p = np.clip(0.35 * y + rng.random((n, k)) * 0.65, 0, 1)
        return y, np.round(p, 2)  # rounding makes ties
    k = 2 if task == "binary" else k
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.2 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p = np.round(p, 2)  # ties in scores and confidences
    p[:, -1] = 1 - p[:, :-1].sum(1)
    return y, p


def _reference(y, p, task, threshold):
    """The metrics of one resampled data set from the per-metric functions of metrics.py."""
    ref = compute_metrics(y, p, task)
    if task != "multilabel":
        ref["aurc"] = aurc(y, p)
        ref["coverage_at_target"] = coverage_at_risk(y, p, 0.1)
    if task == "binary":
        ref.update(operating_point(y == 1, p[:, 1], threshold))
    return ref


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_each_replicate_is_the_metric_of_the_repeated_data(task):
    y, p = _data(task)
    names = {
        "binary": [
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "auroc",
            "ece",
            "nll",
            "brier",
            "sensitivity",
            "specificity",
            "ppv",
            "npv",
            "sensitivity_at_0.5",
            "specificity_at_0.5",
            "aurc",
            "coverage_at_target",
        ],
        "multiclass": [*headline_names("multiclass", 3), "aurc", "coverage_at_target"],
        "multilabel": ["accuracy", "auroc", "nll", "brier"],
    }[task]
    rng = np.random.default_rng(1)
    w = rng.integers(0, 4, (12, len(y)))
    w[0] = 1  # the data as it is
    w[1, y[:, 0] == 1 if task == "multilabel" else y == 1] = 0  # a class never drawn
    got = replicate_metrics(y, p, w, names, task, threshold=0.4)
    assert list(got) == names
    for b in range(len(w)):
        idx = np.repeat(np.arange(len(y)), w[b])
        ref = _reference(y[idx], p[idx], task, 0.4)
        for m in names:
            assert got[m][b] == pytest.approx(ref[m], rel=1e-9, abs=1e-12, nan_ok=True), (m, b)


def test_weighted_metrics_match_scikit_learn_sample_weights():
    y, p = _data("multiclass", n=150, k=4, seed=3)
    w = np.random.default_rng(2).random(150) * 3  # real-valued weights
    got = {k: v[0] for k, v in replicate_metrics(y, p, w, task="multiclass").items()}
    pred = p.argmax(1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred, sample_weight=w))
    assert got["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, pred, sample_weight=w)
    )
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", sample_weight=w))
    assert got["auroc"] == pytest.approx(
        skm.roc_auc_score(y, p, multi_class="ovr", average="macro", sample_weight=w)
    )
    assert got["nll"] == pytest.approx(skm.log_loss(y, p, labels=list(range(4)), sample_weight=w))
    yb, pb = _data("binary", n=150, seed=4)
    got = replicate_metrics(yb, pb, w, ["auroc"], "binary")["auroc"][0]
    assert got == pytest.approx(skm.roc_auc_score(yb, pb[:, 1], sample_weight=w))


def test_undefined_rows_and_bad_input():
    y, p = _data("binary", n=20)
    w = np.ones((3, 20))
    w[1] = 0  # an empty subgroup
    w[2, y == 0] = 0  # positives only: AUROC and specificity undefined
    out = replicate_metrics(y, p, w, task="binary", threshold=0.5)
    assert all(np.isnan(v[1]) for v in out.values())
    assert np.isnan(out["auroc"][2]) and np.isnan(out["specificity"][2])
    assert out["accuracy"][2] == pytest.approx(np.mean(p[y == 1].argmax(1) == 1))
    with pytest.raises(ConfigError, match="unknown metric 'f2'"):
        replicate_metrics(y, p, w, ["f2"], "binary")
    with pytest.raises(ConfigError, match="unknown metric 'sensitivity' for a multiclass"):
        replicate_metrics(*_data("multiclass"), np.ones(90), ["sensitivity"])
    with pytest.raises(ConfigError, match="operating-point threshold"):
        replicate_metrics(y, p, w, ["sensitivity"], "binary")
    with pytest.raises(DataError, match=r"weights must be \(B, 20\)"):
        replicate_metrics(y, p, np.ones((2, 19)), task="binary")


def _loop_ci(y, p, task, n_boot, alpha, seed, groups=None, threshold=None):
    """The bootstrap as a plain loop: one resample of positions at a time, metrics.py on it."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        ids = sorted(set(groups.tolist()))
        members = [np.flatnonzero(groups == g) for g in ids]
    reps: dict[str, list[float]] = {}
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, len(y), len(y))
        else:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[i] for i in pick])
        ref = _reference(y[idx], p[idx], task, threshold)
        for k, v in ref.items():
            reps.setdefault(k, []).append(v)
    out = {}
    for k, v in reps.items():
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[k] = (lo, hi, len(v))
    return out


@pytest.mark.parametrize(
    ("task", "patients"), [("binary", False), ("binary", True), ("multiclass", True)]
)
def test_bootstrap_ci_equals_the_plain_loop_for_the_same_seed(task, patients):
    y, p = _data(task, n=61)  # odd sizes: the draws must be the loop's, call by call
    groups = np.array([f"p{i // 3:02d}" for i in range(61)])[::-1] if patients else None
    threshold = 0.45 if task == "binary" else None
    names = headline_names(task, p.shape[1], threshold is not None)
    got = bootstrap_ci(y, p, names, 150, 0.1, 7, groups, task=task, threshold=threshold)
    ref = _loop_ci(y, p, task, 150, 0.1, 7, groups, threshold)
    assert list(got) == list(names)
    for m in names:
        lo, hi, used = ref[m]
        assert got[m]["low"] == pytest.approx(lo, rel=1e-9, abs=1e-12), m
        assert got[m]["high"] == pytest.approx(hi, rel=1e-9, abs=1e-12), m
        assert got[m]["n_boot"] == used


def test_resample_weights_draw_whole_patients_in_memory_sized_blocks(monkeypatch):
    groups = np.array(["p2", "p1", "p2", "p3", "p3", "p3"])
    w = resample_weights(6, 40, np.random.default_rng(0), groups)
    assert w.shape == (40, 6)
    assert (w[:, 0] == w[:, 2]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
    # each row draws 3 patients (with replacement), in the loop's order of sorted patient ids
    counts = draw_counts(3, 40, np.random.default_rng(0))
    assert (counts.sum(1) == 3).all()
    np.testing.assert_array_equal(w[:, [1, 0, 3]], counts)
    # blocks: the same rows, fewer at a time
    monkeypatch.setattr("clinadapt.evaluation.bootstrap.CHUNK", 6 * 7)
    blocks = list(iter_resample_weights(6, 40, np.random.default_rng(0), groups))
    assert [len(b) for b in blocks] == [7] * 5 + [5]
    np.testing.assert_array_equal(np.concatenate(blocks), w)


@pytest.mark.parametrize("n_units", [1, 2, 3, 7, 64, 82, 255, 256, 257, 965, 4097])
def test_draw_counts_are_the_plain_loops_draws(n_units):
    loop_rng, rng = np.random.default_rng(n_units), np.random.default_rng(n_units)
    expected = np.zeros((9, n_units), dtype=np.int64)
    for b in range(9):  # the loop: one draw of n_units units per resample
        np.add.at(expected[b], loop_rng.integers(0, n_units, n_units), 1)
    np.testing.assert_array_equal(draw_counts(n_units, 9, rng), expected)
    assert rng.integers(0, 2**40) == loop_rng.integers(0, 2**40)  # the same state after


def test_percentile_ci_leaves_out_undefined_replicates():
    out = percentile_ci({"a": np.array([1.0, np.nan, 3.0, 2.0]), "b": np.array([np.nan])}, 0.5)
    assert out["a"] == {"low": 1.5, "high": 2.5, "n_boot": 3}
    assert out["b"]["n_boot"] == 0 and np.isnan(out["b"]["low"])
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_ci(np.zeros(3, int), np.full((3, 2), 0.5), n_boot=1)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_every_headline_metric_has_a_ci(task):
    y, p = _data(task, n=80)
    meta = {"patient_id": np.repeat(np.arange(40), 2).astype(str)}
    out = evaluate(y, p, task, meta, n_boot=40, threshold=0.5 if task == "binary" else None)
    headline = {m for m in out["metrics"] if m != "n" and not m.endswith("_at_0.5")}
    assert {"ece", "nll", "brier"} & headline or task == "multilabel"
    assert headline <= set(out["ci"]) - {"alpha", "unit"}
    if task == "binary":  # at the operating point, not re-chosen per resample
        ref = _loop_ci(y, p, task, 40, 0.05, 0, meta["patient_id"], threshold=0.5)
        assert out["ci"]["sensitivity"]["low"] == pytest.approx(ref["sensitivity"][0])


def test_paired_bootstrap_resamples_both_models_together():
    y, p = _data("multiclass", n=61, seed=2)
    _, q = _data("multiclass", n=61, seed=3)  # another model's predictions of the same images
    groups = np.array([f"p{i // 2:02d}" for i in range(61)])
    names = ["balanced_accuracy", "auroc", "ece"]
    got = paired_bootstrap_ci(y, p, q, names, 120, 0.1, 5, groups)
    rng = np.random.default_rng(5)  # the loop: one resample of patients, both models on it
    members = [np.flatnonzero(groups == g) for g in sorted(set(groups.tolist()))]
    diffs: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(120):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        a, b = compute_metrics(y[idx], p[idx]), compute_metrics(y[idx], q[idx])
        for m in names:
            diffs[m].append(a[m] - b[m])
    for m in names:
        lo, hi = np.percentile(diffs[m], [5, 95])
        assert got[m]["low"] == pytest.approx(lo, rel=1e-9, abs=1e-12), m
        assert got[m]["high"] == pytest.approx(hi, rel=1e-9, abs=1e-12), m
    same = paired_bootstrap_ci(y, p, p, names, 20, 0.1, 5)
    assert all(v["low"] == v["high"] == 0 for v in same.values())
    with pytest.raises(ConfigError, match="differ in shape"):
        paired_bootstrap_ci(y, p, q[:, :2], names, 20)
    with pytest.raises(ConfigError, match="alpha"):
        paired_bootstrap_ci(y, p, q, names, 20, alpha=1.5)
    with pytest.raises(ConfigError, match="group ids"):
        paired_bootstrap_ci(y, p, q, names, 20, groups=groups[:5])
