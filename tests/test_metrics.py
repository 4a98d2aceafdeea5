import math

import numpy as np
import pytest
from sklearn import metrics as skm

from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.bootstrap import bootstrap_ci, group_members, resample_indices
from clinadapt.evaluation.evaluate import evaluate, headline
from clinadapt.evaluation.metrics import (
    accuracy,
    auroc,
    average_ranks,
    binary_auroc,
    brier,
    compute_metrics,
    confidence_bins,
    expected_calibration_error,
    nll,
    operating_point,
    reliability_bins,
    sensitivity_specificity,
    threshold_for_sensitivity,
)
from clinadapt.evaluation.selective import aurc, coverage_at_risk, risk_coverage_curve
from clinadapt.evaluation.subgroups import subgroup_metrics


def _random_probs(rng, n, k):
    logits = rng.normal(size=(n, k)) * 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_multiclass_metrics_match_sklearn(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 300)
    p = _random_probs(rng, 300, k)
    p[np.arange(300), y] += 0.3  # some skill
    p /= p.sum(1, keepdims=True)
    m = compute_metrics(y, p, "binary" if k == 2 else "multiclass")
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    if k == 2:
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    else:
        assert m["auroc"] == pytest.approx(
            skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
        )
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=list(range(k))))
    onehot = np.eye(k)[y]
    assert m["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, 1)))
    assert m["n"] == 300


def test_auroc_ties_and_degenerate():
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.5, 0.5, 0.5, 0.9])
    assert binary_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert math.isnan(binary_auroc(np.ones(4), np.arange(4.0)))


def test_multilabel_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 4))
    p = np.clip(y * 0.3 + rng.random((200, 4)) * 0.7, 0, 1)
    assert auroc(y, p, "multilabel") == pytest.approx(skm.roc_auc_score(y, p, average="macro"))
    m = compute_metrics(y, p, "multilabel")
    eps = 1e-12
    ref = -np.mean(y * np.log(np.clip(p, eps, 1)) + (1 - y) * np.log(np.clip(1 - p, eps, 1)))
    assert m["nll"] == pytest.approx(ref)
    assert nll(y, p, "multilabel") == pytest.approx(ref)
    assert brier(y, p, "multilabel") == pytest.approx(np.mean(np.sum((p - y) ** 2, 1)))


def test_ece_by_hand():
    # two bins used: conf 0.9 (2 samples, 1 correct) and conf 0.6 (2 samples, 2 correct)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(y, p) == pytest.approx(expected)


def test_sensitivity_specificity_by_hand():
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.4, 0.6, 0.7, 0.1])
    sens, spec = sensitivity_specificity(y, s, 0.5)
    assert sens == pytest.approx(2 / 3)
    assert spec == pytest.approx(1 / 2)


def test_bad_inputs():
    with pytest.raises(DataError, match="NaN"):
        compute_metrics(np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]))
    with pytest.raises(DataError, match="2 labels for 3"):
        compute_metrics(np.array([0, 1]), np.full((3, 2), 0.5))
    with pytest.raises(DataError, match="sum to 1"):
        compute_metrics(np.array([0, 1]), np.full((2, 2), 0.7))
    with pytest.raises(DataError, match="zero"):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 2)))


def test_average_ranks_match_scipy():
    from scipy.stats import rankdata

    x = np.random.default_rng(0).integers(0, 5, 50).astype(float)
    np.testing.assert_allclose(average_ranks(x), rankdata(x))


def test_auroc_with_many_ties_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # heavy ties
    assert binary_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))


def test_threshold_for_target_sensitivity_against_roc_curve():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = rng.random(400) + 0.5 * y
    for target in (0.5, 0.8, 0.9, 0.95, 1.0):
        t = threshold_for_sensitivity(y, s, target)
        _, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
        best = thr[np.flatnonzero(tpr >= target)[0]]  # highest threshold reaching the target
        assert t == pytest.approx(best)
        op = operating_point(y, s, t)
        pred = (s >= t).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
        assert op["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert op["sensitivity"] >= target
        assert op["specificity"] == pytest.approx(tn / (tn + fp))
        assert op["ppv"] == pytest.approx(skm.precision_score(y, pred))
        assert op["npv"] == pytest.approx(tn / (tn + fn))
    with pytest.raises(DataError, match="positive"):
        threshold_for_sensitivity(np.zeros(3), np.ones(3), 0.9)
    with pytest.raises(DataError, match="target sensitivity"):
        threshold_for_sensitivity(y, s, 1.5)


def test_reliability_bins_reproduce_ece():
    rng = np.random.default_rng(1)
    p = _random_probs(rng, 300, 4)
    y = rng.integers(0, 4, 300)
    b = reliability_bins(y, p, 10)
    used = b["count"] > 0
    ece = np.sum(b["count"][used] / 300 * np.abs(b["accuracy"][used] - b["confidence"][used]))
    assert ece == pytest.approx(expected_calibration_error(y, p, 10))
    assert b["count"].sum() == 300
    conf = p.max(1)
    in_last = conf > 0.9
    assert b["count"][-1] == in_last.sum()
    assert b["accuracy"][-1] == pytest.approx(np.mean(p[in_last].argmax(1) == y[in_last]))


def _selective_reference(y, p):
    """Risk after keeping the k most confident, for every k (no ties in these tests)."""
    order = np.argsort(-p.max(1))
    err = (p.argmax(1) != y)[order]
    k = np.arange(1, len(y) + 1)
    return k / len(y), np.array([err[:i].mean() for i in k])


def test_risk_coverage_aurc_and_coverage_at_risk():
    rng = np.random.default_rng(2)
    p = _random_probs(rng, 200, 3)
    y = rng.integers(0, 3, 200)
    cov, risk = risk_coverage_curve(y, p)
    rcov, rrisk = _selective_reference(y, p)
    np.testing.assert_allclose(cov, rcov)
    np.testing.assert_allclose(risk, rrisk)
    assert aurc(y, p) == pytest.approx(rrisk.mean())
    target = 0.55
    assert coverage_at_risk(y, p, target) == pytest.approx(rcov[rrisk <= target].max())
    # hand example: confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong)
    p4 = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    y4 = np.array([0, 0, 0, 0])
    assert aurc(y4, p4) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    assert coverage_at_risk(y4, p4, 0.0) == 0.25
    assert coverage_at_risk(y4, p4, 0.4) == 0.75
    # ties are kept or rejected together
    pt = np.array([[0.7, 0.3], [0.7, 0.3], [0.6, 0.4]])
    cov, risk = risk_coverage_curve(np.array([0, 1, 0]), pt)
    np.testing.assert_allclose(cov, [2 / 3, 1.0])
    np.testing.assert_allclose(risk, [0.5, 1 / 3])


def test_subgroups_worst_and_gap_by_hand():
    y = np.array([0, 1, 0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.4, 0.6], [0.8, 0.2]])
    meta = {"sex": np.array(["F", "F", "M", "M", "M", "M"]), "site": np.array(["a"] * 6)}
    out = subgroup_metrics(y, p, meta, lambda yy, pp: {"accuracy": accuracy(yy, pp)})
    assert set(out) == {"sex"}  # a key with one group says nothing about subgroups
    assert out["sex"]["groups"]["F"] == {"n": 2, "accuracy": 1.0}
    assert out["sex"]["groups"]["M"]["accuracy"] == pytest.approx(0.25)
    assert out["sex"]["worst"]["accuracy"] == {"group": "M", "value": 0.25}
    assert out["sex"]["gap"]["accuracy"] == pytest.approx(0.75)


def test_bootstrap_ci_matches_a_direct_percentile_computation():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    p = _random_probs(rng, 120, 2)
    ci = bootstrap_ci(y, p, lambda yy, pp: {"accuracy": accuracy(yy, pp)}, n_boot=300, seed=7)
    ref_rng = np.random.default_rng(7)
    correct = (p.argmax(1) == y).astype(float)
    reps = [correct[ref_rng.integers(0, 120, 120)].mean() for _ in range(300)]
    assert ci["accuracy"]["low"] == pytest.approx(np.percentile(reps, 2.5))
    assert ci["accuracy"]["high"] == pytest.approx(np.percentile(reps, 97.5))
    assert ci["accuracy"]["low"] < accuracy(y, p) < ci["accuracy"]["high"]
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_ci(y, p, lambda a, b: {}, n_boot=1)


def test_patient_level_bootstrap_keeps_patients_together():
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p3"])
    members = group_members(groups)
    assert sorted(map(list, members)) == [[0, 1], [2], [3, 4, 5]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = resample_indices(6, rng, members)
        drawn = groups[idx]
        for g in set(drawn):  # every drawn patient comes with all its images, as often
            assert np.sum(drawn == g) % np.sum(groups == g) == 0
    # with perfectly correlated images per patient, patient resampling gives wider intervals
    rng = np.random.default_rng(1)
    pid = np.repeat(np.arange(30), 10).astype(str)
    right = np.repeat(rng.random(30) < 0.7, 10)
    y = np.zeros(300, int)
    p = np.where(right[:, None], [[0.8, 0.2]], [[0.2, 0.8]])
    stat = lambda yy, pp: {"accuracy": accuracy(yy, pp)}  # noqa: E731
    wide = bootstrap_ci(y, p, stat, 400, groups=pid)["accuracy"]
    narrow = bootstrap_ci(y, p, stat, 400)["accuracy"]
    assert wide["high"] - wide["low"] > 2 * (narrow["high"] - narrow["low"])


def test_evaluate_binary_with_subgroups_ci_selective_and_validation_threshold():
    rng = np.random.default_rng(5)
    n = 200
    y = rng.integers(0, 2, n)
    s = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, n), 0, 1)
    p = np.stack([1 - s, s], 1)
    meta = {
        "sex": rng.choice(["F", "M"], n),
        "patient_id": np.repeat(np.arange(100), 2).astype(str),
    }
    vy = rng.integers(0, 2, 100)
    vs = np.clip(0.3 + 0.4 * vy + rng.normal(0, 0.2, 100), 0, 1)
    out = evaluate(y, p, "binary", meta, n_boot=50, val=(vy, np.stack([1 - vs, vs], 1)))
    op = out["operating_point"]
    assert out["metrics"] == {
        **compute_metrics(y, p, "binary"),
        "sensitivity": op["sensitivity"],
        "specificity": op["specificity"],
    }
    assert out["ci"]["unit"] == "patient"
    assert out["ci"]["auroc"]["low"] <= out["metrics"]["auroc"] <= out["ci"]["auroc"]["high"]
    t = threshold_for_sensitivity(vy, vs, 0.9)
    assert out["operating_point"]["threshold"] == pytest.approx(t)
    assert out["operating_point"]["sensitivity"] == pytest.approx(np.mean(s[y == 1] >= t))
    f = meta["sex"] == "F"
    assert out["subgroups"]["sex"]["groups"]["F"]["auroc"] == pytest.approx(
        skm.roc_auc_score(y[f], s[f])
    )
    assert out["selective"]["aurc"] == pytest.approx(aurc(y, p))
    fixed = evaluate(y, p, "binary", n_boot=0, threshold=0.4)
    assert "ci" not in fixed and fixed["operating_point"]["chosen_on"] == "given"
    assert fixed["operating_point"]["specificity"] == pytest.approx(np.mean(s[y == 0] < 0.4))


def test_headline_sensitivity_is_at_the_validation_operating_point():
    """Not at 0.5: the threshold that reaches the target sensitivity on validation."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.2 + 0.3 * y + rng.normal(0, 0.15, 300), 0, 1)  # positives mostly below 0.5
    vy = rng.integers(0, 2, 150)
    vs = np.clip(0.2 + 0.3 * vy + rng.normal(0, 0.15, 150), 0, 1)
    p, vp = np.stack([1 - s, s], 1), np.stack([1 - vs, vs], 1)
    out = evaluate(y, p, "binary", n_boot=0, val=(vy, vp), target_sensitivity=0.8)
    t = out["operating_point"]["threshold"]
    assert t < 0.45  # far from 0.5, so the two definitions differ
    m = out["metrics"]
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, s >= t))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, s < t))
    assert m["sensitivity"] >= 0.7 and m["sensitivity"] != pytest.approx(m["sensitivity_at_0.5"])
    assert m["sensitivity_at_0.5"] == pytest.approx(skm.recall_score(y, s >= 0.5))
    assert m["specificity_at_0.5"] == pytest.approx(skm.recall_score(1 - y, s < 0.5))
    # without validation data or a given threshold the operating point is 0.5, and says so
    plain = evaluate(y, p, "binary", n_boot=0)
    assert plain["operating_point"]["chosen_on"] == "default"
    assert "note" not in plain["operating_point"]
    # validation data without a positive example cannot set it: 0.5, and the record says why
    # (it used to fail here, after the whole training)
    for val in ((np.zeros(20, int), vp[:20]), (np.zeros(0, int), vp[:0])):
        none = evaluate(y, p, "binary", n_boot=0, val=val)["operating_point"]
        assert none["chosen_on"] == "default" and none["threshold"] == 0.5
        assert "no positive example" in none["note"]
        assert none == {**plain["operating_point"], "note": none["note"]}
    assert plain["metrics"]["sensitivity"] == plain["metrics"]["sensitivity_at_0.5"]
    four = np.eye(4)[rng.integers(0, 4, 50)] * 0.6 + 0.1
    assert not {"sensitivity", "sensitivity_at_0.5"} & set(
        evaluate(four.argmax(1), four, "multiclass", n_boot=0)["metrics"]
    )


def test_evaluate_multilabel_and_errors():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, (80, 3))
    p = np.clip(y * 0.4 + rng.random((80, 3)) * 0.6, 0, 1)
    out = evaluate(y, p, "multilabel", {"sex": rng.choice(["F", "M"], 80)}, n_boot=20)
    assert "selective" not in out and "operating_point" not in out
    assert headline(y, p, "multilabel")["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))
    with pytest.raises(ConfigError, match="metadata 'sex' has 3 values"):
        evaluate(y, p, "multilabel", {"sex": np.array(["F", "M", "F"])})
    with pytest.raises(ConfigError, match="unknown metric 'f2'"):
        headline(y[:, 0], np.stack([1 - p[:, 0], p[:, 0]], 1), "binary", ["f2"])


def test_macro_f1_averages_over_the_classes_present_like_sklearn():
    """A perfect classifier on 2 of 4 classes scores 1 (it scored 0.5 when absent classes
    counted as 0); a predicted absent class still costs, as in scikit-learn."""
    y = np.array([0, 0, 1, 1, 1])
    perfect = np.eye(4)[y]
    assert compute_metrics(y, perfect)["macro_f1"] == 1.0
    assert skm.f1_score(y, perfect.argmax(1), average="macro") == 1.0
    wrong = np.eye(4)[[0, 3, 1, 1, 1]]  # one image called class 3, which is absent
    assert compute_metrics(y, wrong)["macro_f1"] == pytest.approx(
        skm.f1_score(y, wrong.argmax(1), average="macro")
    )
    rng = np.random.default_rng(3)
    for _ in range(20):
        yy = rng.choice([0, 2, 5], 40)
        p = _random_probs(rng, 40, 6)
        assert compute_metrics(yy, p)["macro_f1"] == pytest.approx(
            skm.f1_score(yy, p.argmax(1), average="macro")
        )


def test_confidence_bins_are_half_open_equal_width_intervals():
    conf = np.array([0.0, 1e-9, 1 / 15, 1 / 15 + 1e-12, 0.5, 14 / 15, 1.0, 1.0 + 1e-6])
    # (i/15, (i+1)/15], the first bin also holding 0; above 1 is outside every bin
    np.testing.assert_array_equal(confidence_bins(conf, 15), [0, 0, 0, 1, 7, 13, 14, 15])
    assert confidence_bins(np.array([0.25, 0.5, 0.75]), 2).tolist() == [0, 0, 1]
