"""What a test-time record shows: the stream's batch, what each method did, change vs source."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from clinadapt.classifier import ImageClassifier
from clinadapt.config import RunConfig
from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.evaluation.compare import change_vs_source, degradations, describe
from clinadapt.evaluation.metrics import compute_metrics
from clinadapt.methods import METHODS, Context, FitMethod, StreamResult, TTAMethod
from clinadapt.methods.trace import summarise, warnings_for
from clinadapt.methods.tta.adapter import Adapter, Step, StreamMethod, run_stream
from clinadapt.methods.tta.guard import CollapseGuard
from clinadapt.methods.tta.protocol import order_stream, run_tta
from clinadapt.methods.tta.tda import TDAOptions, tda_logits
from clinadapt.models import load_model
from clinadapt.runner import run_experiment
from clinadapt.targets import apply_target

K = 4
SMALL = {"patients_per_site": 12}
QUICK_SOURCE = {"options": {"epochs": 1}}


@pytest.fixture(scope="module")
def data():
    return make_clinical_shift(seed=0, patients_per_site=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ImageClassifier(load_model("tiny-resnet"), K)
    apply_target(m, "norm")
    return m


# --- the stream's batch size ------------------------------------------------------------------
def test_stream_batch_size_is_its_own_field_and_reuses_the_source_fit(tmp_path):
    common = dict(method="tent", data_options=SMALL, source=QUICK_SOURCE, out_dir=str(tmp_path))
    a = run_experiment(RunConfig(**common), write=False)
    b = run_experiment(RunConfig(stream_batch_size=8, **common), write=False)
    trained = a["source"]["training"]["checkpoint"]
    reused = b["source"]["training"]
    assert (reused["reused"], reused["weights"]) == (trained, f"cache/{trained}")
    # the fit's summary is kept beside the cached model: a reused source still has its history
    assert reused["history"] == a["source"]["training"]["history"]
    assert (a["tta"]["stream_batch_size"], b["tta"]["stream_batch_size"]) == (32, 8)
    for name, n in b["tta"]["stream_sizes"].items():
        assert b["tta"]["trace"][name]["size"] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
        assert b["tta"]["trace"][name]["position"] == list(range(0, n, 8))
    # the source's own training batch still keys its fit
    c = run_experiment(RunConfig(batch_size=16, **common), write=False)
    assert c["source"]["training"]["checkpoint"] != trained


def test_a_run_that_leaves_every_source_prediction_unchanged_says_why(tmp_path):
    """A LayerNorm model whose test sets are one stream batch each: Tent predicts every batch
    before its update, so its numbers are the source's. The record and the log say so, and
    why; with several batches per set it adapts and nothing is said."""
    common = dict(model="tiny-vit", data_options=SMALL, source=QUICK_SOURCE, out_dir=str(tmp_path))
    source = run_experiment(RunConfig(method="source", **common))
    plain = np.load(tmp_path / "predictions" / f"{source['run_id']}.npz")
    for size in (64, 8):
        rec = run_experiment(RunConfig(method="tent", stream_batch_size=size, **common))
        probs = np.load(tmp_path / "predictions" / f"{rec['run_id']}.npz")
        same = {
            n
            for n in rec["metrics"]
            if np.abs(probs[f"probs/{n}"] - plain[f"probs/{n}"]).max() == 0
        }
        said = [w for w in rec["tta"]["warnings"] if "equals the unadapted source's" in w]
        assert len(said) == len(same) and all(any(f" on {n}:" in w for w in said) for n in same)
        if size == 64:
            assert max(rec["tta"]["stream_sizes"].values()) <= 64 and same == set(rec["metrics"])
            assert all("one stream batch" in w and "stream_batch_size 64" in w for w in said)
        else:
            assert len(same) < len(rec["metrics"])  # the sets of several batches moved


def test_a_prediction_never_depends_on_later_images(data, model):
    """Cutting a stream after two batches leaves every earlier prediction as it was."""
    stream = order_stream(data.where(domain="site-b").subset(range(24)), "class-sorted", 0)
    for name in ("tent", "eata", "sar", "t3a", "vnl", "bn", "tda"):
        method = METHODS.get(name)()
        opts = method.parse_options({"fisher_alpha": 0.0} if name == "eata" else {})
        ctx = Context(batch_size=8)
        whole = method.adapt(model, stream, opts, ctx).probs
        cut = method.adapt(model, stream.subset(range(16)), opts, ctx).probs
        np.testing.assert_allclose(whole[:16], cut, atol=1e-6, err_msg=name)


# --- change against the unadapted source --------------------------------------------------------
def test_tta_record_holds_the_source_on_the_same_streams_and_the_change(tmp_path):
    common = dict(data_options=SMALL, source=QUICK_SOURCE, out_dir=str(tmp_path))
    src = run_experiment(RunConfig(method="source", **common), write=False)
    rec = run_experiment(
        RunConfig(method="tent", method_options={"lr": 0.05}, stream_batch_size=8, **common),
        write=False,
    )
    assert "vs_source" not in src and "source_metrics" not in src
    assert set(rec["source_metrics"]) == set(rec["metrics"])
    for name, m in rec["source_metrics"].items():
        for k in ("accuracy", "balanced_accuracy", "auroc", "ece"):
            # independent: the source run itself evaluated the same streams
            assert m[k] == pytest.approx(src["metrics"][name][k], abs=1e-9)
            c = rec["vs_source"][name][k]
            assert c["change"] == pytest.approx(rec["metrics"][name][k] - m[k], abs=1e-12)
        ba = rec["vs_source"][name]["balanced_accuracy"]
        assert ba["low"] <= ba["high"]
    below = {
        (n, m)
        for n, per in rec["vs_source"].items()
        for m in ("balanced_accuracy", "auroc")
        if per[m]["change"] < 0
    }
    flagged = {(d["set"], d["metric"]) for per in rec["degraded"].values() for d in per}
    assert flagged == below and set(rec["degraded"]) == set(rec["metrics"])


def test_change_vs_source_by_hand_and_degradations_flagged():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.15, 300), 0.01, 0.99)
    source = np.stack([1 - score, score], 1)
    adapted = np.stack([np.full(300, 0.9), np.full(300, 0.1)], 1)  # all called negative
    adapted[:, 1] += rng.normal(0, 0.01, 300)  # a little ranking left
    adapted[:, 0] = 1 - adapted[:, 1]
    am, sm = compute_metrics(y, adapted, "binary"), compute_metrics(y, source, "binary")
    out = change_vs_source(y, adapted, source, "binary", am, sm, n_boot=300, seed=1)
    ba_a = balanced_accuracy_score(y, adapted.argmax(1))
    ba_s = balanced_accuracy_score(y, source.argmax(1))
    assert out["balanced_accuracy"]["change"] == pytest.approx(ba_a - ba_s)
    auc = roc_auc_score(y, adapted[:, 1]) - roc_auc_score(y, source[:, 1])
    assert out["auroc"]["change"] == pytest.approx(auc)
    assert out["balanced_accuracy"]["high"] < 0 and out["auroc"]["high"] < 0
    flagged = degradations({"site-b": out})
    assert {d["metric"] for d in flagged} == {"balanced_accuracy", "auroc"}
    assert all(d["significant"] and d["set"] == "site-b" for d in flagged)
    assert "below the unadapted source" in describe("tent", flagged[0])
    # the same model on both sides: no change, a CI of exactly 0, nothing flagged
    same = change_vs_source(y, source, source, "binary", sm, sm, n_boot=50)
    assert same["balanced_accuracy"] == {
        "source": sm["balanced_accuracy"],
        "adapted": sm["balanced_accuracy"],
        "change": 0.0,
        "low": 0.0,
        "high": 0.0,
    }
    assert degradations({"x": same}) == []


# --- what each method did ---------------------------------------------------------------------
class CertainAdapter(Adapter):
    """Predicts class 0 with certainty and never learns: a collapsed stream."""

    def __init__(self, model):
        super().__init__(model, None)
        self.resets = 0

    def on_reset(self):
        self.resets += 1

    def forward_and_adapt(self, x):
        logits = torch.zeros(len(x), K)
        logits[:, 0] = 30.0
        return Step(logits)


def test_guard_watches_by_default_and_resets_only_when_asked(data, model):
    stream = data.where(domain="site-b").subset(range(24))
    ctx = Context(batch_size=8)
    for name in ("tent", "eata", "sar", "memo", "t3a", "vnl", "tttpp"):
        assert METHODS.get(name)().parse_options({}).guard == "watch"
    watch = CertainAdapter(model)
    res = run_stream(watch, stream, ctx, CollapseGuard(K, window=16), False, "certain")
    assert [r["collapse"] for r in res.trace] == [0, 1, 1]
    assert [r["reset"] for r in res.trace] == [0, 0, 0] and watch.resets == 0
    assert [e["kind"] for e in res.events] == ["would-reset", "would-reset"]
    assert summarise(res.trace)["would_be_resets"] == 2
    reset = CertainAdapter(model)
    res = run_stream(reset, stream, ctx, CollapseGuard(K, window=16), True, "certain")
    # the reset clears the window: the third batch alone does not fill it again
    assert [r["collapse"] for r in res.trace] == [0, 1, 0]
    assert [r["reset"] for r in res.trace] == [0, 1, 0] and reset.resets == 1
    assert [e["kind"] for e in res.events] == ["reset"]
    assert [r["diversity"] for r in res.trace] == [0.0, 0.0, 0.0]


def test_run_tta_accounts_per_set_and_warns_when_a_mechanism_fires_on_most_batches(data, model):
    sets = {"site-b": data.where(domain="site-b").subset(range(24))}
    sar = METHODS.get("sar")()
    opts = sar.parse_options({"e_margin": 1.0, "reset_constant": 100.0})
    info = run_tta(sar, model, sets, opts, Context(batch_size=8)).info
    s = info["per_set"]["site-b"]
    assert (info["recoveries"], info["resets"], s["batches"], s["images"]) == (3, 0, 3, 24)
    assert info["guard"] == "watch" and info["stream_batch_size"] == 8
    assert any("recovery reset the model on 3 of 3 batches" in w for w in info["warnings"])
    assert info["trace"]["site-b"]["recovery"] == [1, 1, 1]
    # EATA with the published margin on an uncertain model: its filters pass (almost) nothing
    eata = METHODS.get("eata")()
    opts = eata.parse_options({"fisher_alpha": 0.0})
    info = run_tta(eata, model, sets, opts, Context(batch_size=8)).info
    s = info["per_set"]["site-b"]
    trace = info["trace"]["site-b"]
    assert s["used_fraction"] == sum(trace["used"]) / 24
    assert s["reliable_fraction"] == sum(trace["reliable"]) / 24
    assert s["updates"] == sum(trace["updates"])
    assert (s["batches_with_samples_used"] < 2) == any("filters" in w for w in info["warnings"])


def test_warning_rules_on_a_hand_made_trace():
    row = dict(position=0, size=4, entropy=0.5, diversity=1.0, top_share=0.25, collapse=0)
    rows = [
        {**row, "used": 0, "reliable": 1, "updates": 0, "loss": None, "recovery": 1, "reset": 0},
        {**row, "used": 2, "reliable": 3, "updates": 1, "loss": 0.3, "recovery": 1, "reset": 0},
        {**row, "used": 0, "reliable": 0, "updates": 0, "loss": None, "recovery": 0, "reset": 0},
    ]
    rows[2]["collapse"] = 1
    s = summarise(rows)
    assert s["used_fraction"] == pytest.approx(2 / 12) and s["reliable_fraction"] == 4 / 12
    assert (s["recoveries"], s["batches_with_samples_used"], s["would_be_resets"]) == (2, 1, 1)
    w = warnings_for("x", "site", s, guarded=True)
    assert len(w) == 3 and "guard=reset" in w[2]
    assert "guard=reset" not in warnings_for("bn", "site", s, guarded=False)[2]


def test_bn_and_tda_get_the_monitor_trace_and_continual_traces_split_by_set(data, model):
    sets = {
        "site-b": data.where(domain="site-b").subset(range(20)),
        "site-c": data.where(domain="site-c").subset(range(12)),
    }
    bn = METHODS.get("bn")()
    info = run_tta(bn, model, sets, bn.parse_options({}), Context(batch_size=8)).info
    assert info["trace"]["site-b"]["size"] == [8, 8, 4] and info["guard"] is None
    assert info["trace"]["site-b"]["used"] == [None] * 3
    assert all(0 <= e <= 1 for e in info["trace"]["site-c"]["entropy"])
    tent = METHODS.get("tent")()
    info = run_tta(
        tent, model, sets, tent.parse_options({}), Context(batch_size=8), protocol="continual"
    ).info
    # rows belong to the set of their first image: 0, 8, 16 (16-23 straddles) and 24 -> 4
    assert info["trace"]["site-b"]["position"] == [0, 8, 16]
    assert info["trace"]["site-c"]["position"] == [4]


# --- methods as published ---------------------------------------------------------------------
def _logits_with_entropy(h: float, k: int = K) -> list[float]:
    """Logits [a, 0, ..., 0] whose softmax entropy (nats) is ``h``, by bisection on a."""
    lo, hi = 0.0, 50.0
    for _ in range(200):
        a = (lo + hi) / 2
        p = torch.softmax(torch.tensor([a] + [0.0] * (k - 1)), 0)
        ent = float(-(p * p.log()).sum())
        lo, hi = (a, hi) if ent > h else (lo, a)
    return [a] + [0.0] * (k - 1)


def test_tda_negative_band_is_entropy_over_log2_k_as_the_authors():
    feats = torch.ones(1, 3)
    # H / ln K = 0.25 is inside (0.2, 0.5) but H / log2 K = 0.17 is not: does not join
    low = torch.tensor([_logits_with_entropy(0.25 * math.log(K))])
    assert tda_logits(low, feats, TDAOptions())[1]["negative_joined"] == 0
    # H / ln K = 0.6 is outside, H / log2 K = 0.42 inside: joins
    mid = torch.tensor([_logits_with_entropy(0.6 * math.log(K))])
    assert tda_logits(mid, feats, TDAOptions())[1]["negative_joined"] == 1


def test_method_hooks_are_declared_on_the_base_classes():
    assert TTAMethod.source_method is None
    assert METHODS.get("tttpp").source_method == "tttpp-source"
    assert METHODS.get("tent").source_method is None
    assert FitMethod.uses_unlabelled is False
    assert METHODS.get("dapl").uses_unlabelled is True
    assert METHODS.get("finetune").uses_unlabelled is False
    assert METHODS.get("tent").prepare is TTAMethod.prepare  # nothing to prepare
    assert METHODS.get("eata").prepare is not TTAMethod.prepare
    assert issubclass(METHODS.get("tent"), StreamMethod)
    assert StreamResult.of(torch.ones(2, 3)).probs.dtype == np.float64
