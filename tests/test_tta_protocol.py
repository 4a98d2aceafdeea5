"""Streams, protocols, the collapse guard and the runner's test-time branch."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clinadapt.classifier import ImageClassifier
from clinadapt.config import RunConfig
from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.methods import METHODS, Context
from clinadapt.methods.tta.guard import CollapseGuard, non_finite
from clinadapt.methods.tta.protocol import (
    concat_streams,
    imbalanced_positions,
    order_stream,
    run_tta,
    source_method_for,
)
from clinadapt.models import load_model
from clinadapt.runner import run_experiment
from clinadapt.targets import apply_target

SMALL = {"patients_per_site": 12}
QUICK_SOURCE = {"options": {"epochs": 1}}
# a source model that is good on its own site and drops on the others (see the slow test)
PATIENTS, EPOCHS = 300, 12


@pytest.fixture(scope="module")
def data():
    return make_clinical_shift(seed=0, patients_per_site=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ImageClassifier(load_model("tiny-resnet"), 4)
    apply_target(m, "norm")
    return m


def two_sets(data):
    return {
        "site-b": data.where(domain="site-b").subset(range(20)),
        "site-c": data.where(domain="site-c").subset(range(12)),
    }


# --- orders -----------------------------------------------------------------------------------
def test_stream_orders(data):
    ds = data.where(domain="site-b")
    rnd = order_stream(ds, "random", seed=3)
    np.testing.assert_array_equal(
        rnd.index, ds.index[np.random.default_rng(3).permutation(len(ds))]
    )
    srt = order_stream(ds, "class-sorted", seed=3)
    assert (np.diff(srt.labels) >= 0).all()
    assert sorted(srt.index.tolist()) == sorted(ds.index.tolist())
    imb = order_stream(ds, "imbalanced", seed=3)
    counts = np.bincount(imb.labels, minlength=4)
    full = np.bincount(ds.labels, minlength=4)
    base = full[full > 0].min()
    present = np.flatnonzero(full)
    for rank, k in enumerate(present):
        assert counts[k] == max(1, round(base * 10 ** (-rank / (len(present) - 1))))
    assert set(imb.index) <= set(ds.index)
    with pytest.raises(ConfigError, match="stream order"):
        order_stream(ds, "sideways", 0)


def test_imbalanced_positions_ratio():
    labels = np.repeat(np.arange(3), 100)
    pos = imbalanced_positions(labels, 3, 4.0, np.random.default_rng(0))
    assert np.bincount(labels[pos]).tolist() == [100, 50, 25]
    assert len(set(pos.tolist())) == len(pos)


def test_concat_streams_keeps_order_and_refuses_foreign_sources(data):
    sets = two_sets(data)
    whole = concat_streams(list(sets.values()), "all")
    assert len(whole) == 32
    np.testing.assert_array_equal(whole.labels[:20], sets["site-b"].labels)
    np.testing.assert_array_equal(whole.meta("domain")[20:], sets["site-c"].meta("domain"))
    other = make_clinical_shift(seed=1, patients_per_site=5)
    with pytest.raises(IncompatibleError, match="one dataset"):
        concat_streams([sets["site-b"], other], "x")


# --- protocols --------------------------------------------------------------------------------
def test_per_shift_starts_each_set_from_the_source(data, model):
    tent = METHODS.get("tent")()
    opts = tent.parse_options({"lr": 0.01})
    sets = two_sets(data)
    res = run_tta(tent, model, sets, opts, Context(batch_size=8), protocol="per-shift")
    alone = run_tta(tent, model, {"site-c": sets["site-c"]}, opts, Context(batch_size=8))
    np.testing.assert_allclose(res.probs["site-c"], alone.probs["site-c"], atol=1e-6)
    assert res.info["protocol"] == "per-shift" and res.info["resets"] == 0
    # the model handed in is never changed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_tta(tent, model, sets, opts, Context(batch_size=8), protocol="continual")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_continual_carries_state_and_episodic_resets_every_batch(data, model):
    tent = METHODS.get("tent")()
    opts = tent.parse_options({"lr": 0.05})
    sets = two_sets(data)
    ctx = Context(batch_size=8)
    per = run_tta(tent, model, sets, opts, ctx, protocol="per-shift")
    cont = run_tta(tent, model, sets, opts, ctx, protocol="continual")
    # the last batch of site-b (4 images) shares its batch with site-c in the continual stream
    np.testing.assert_allclose(cont.probs["site-b"][:16], per.probs["site-b"][:16], atol=1e-6)
    assert not np.allclose(cont.probs["site-c"], per.probs["site-c"], atol=1e-4)
    assert cont.info["stream_sizes"] == {"site-b": 20, "site-c": 12}
    epi = run_tta(tent, model, sets, opts, ctx, protocol="episodic")
    stream = order_stream(sets["site-b"], "random", 0)
    second = tent.adapt(model, stream.subset(range(8, 16)), opts, ctx).probs
    np.testing.assert_allclose(epi.probs["site-b"][8:16], second, atol=1e-6)
    # the first batch of a stream is the same under every protocol
    np.testing.assert_allclose(epi.probs["site-b"][:8], per.probs["site-b"][:8], atol=1e-6)
    with pytest.raises(ConfigError, match="protocol"):
        run_tta(tent, model, sets, opts, ctx, protocol="forever")


def test_single_sample_stream_runs_for_batchnorm_methods(data, model):
    sets = {"site-b": data.where(domain="site-b").subset(range(5))}
    for name in ("bn", "tent", "eata", "sar"):
        method = METHODS.get(name)()
        opts = method.parse_options({"fisher_size": 4} if name == "eata" else {})
        res = run_tta(method, model, sets, opts, Context(batch_size=1), source=sets["site-b"])
        p = res.probs["site-b"]
        assert p.shape == (5, 4) and np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


# --- collapse guard ---------------------------------------------------------------------------
def test_guard_sees_a_collapsing_stream_and_not_a_healthy_one():
    collapsed = torch.full((16, 4), 1e-6)
    collapsed[:, 2] = 1 - 3e-6
    guard = CollapseGuard(4, window=32)
    first = guard.observe(collapsed)
    assert first.collapse is None  # window not yet full
    assert first.top_share == 1.0 and first.diversity == 0.0
    reason = guard.observe(collapsed).collapse
    assert reason and "collapse" in reason
    # confident but diverse predictions are healthy; diversity 1 = every class equally often
    healthy = torch.eye(4).repeat(4, 1) * (1 - 4e-6) + 1e-6
    guard = CollapseGuard(4, window=32)
    readings = [guard.observe(healthy) for _ in range(5)]
    assert all(r.collapse is None for r in readings)
    assert readings[-1].diversity == pytest.approx(1.0) and readings[-1].top_share == 0.25
    # the batch entropy is H / ln K: a uniform prediction has 1
    uniform = guard.observe(torch.full((3, 4), 0.25))
    assert uniform.entropy == pytest.approx(1.0)
    # one class, but uncertain: healthy too
    unsure = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).repeat(32, 1)
    reading = CollapseGuard(4, window=32).observe(unsure)
    p = np.array([0.4, 0.2, 0.2, 0.2])
    assert reading.collapse is None
    assert reading.entropy == pytest.approx(-(p * np.log(p)).sum() / np.log(4), rel=1e-6)
    # a non-finite loss or prediction is named whatever the monitor says
    assert "non-finite loss" in non_finite(healthy[:2], loss=float("nan"))
    assert "non-finite predictions" in non_finite(torch.full((1, 4), float("nan")))
    assert non_finite(healthy[:2], loss=0.3) is None


def test_collapse_resets_to_source_and_is_counted(data, model):
    stream = {"site-b": data.where(domain="site-b").subset(range(24))}
    tent = METHODS.get("tent")()
    # an absurd step size drives the model to non-finite outputs
    opts = tent.parse_options({"optimizer": "sgd", "lr": 1e30, "momentum": 0.0})
    ctx = Context(batch_size=8)
    res = run_tta(tent, model, stream, opts, ctx)
    assert res.info["resets"] >= 1 and res.info["per_set"]["site-b"]["resets"] == res.info["resets"]
    assert all("non-finite" in e["reason"] for e in res.info["events"])
    assert sum(res.info["trace"]["site-b"]["reset"]) == res.info["resets"]
    assert np.isfinite(res.probs["site-b"]).all()
    src = METHODS.get("source")()
    base = run_tta(src, model, stream, src.parse_options({}), Context(batch_size=8))
    assert base.info["resets"] == 0


def test_source_method_resolution():
    tttpp, tent = METHODS.get("tttpp")(), METHODS.get("tent")()
    assert source_method_for(tttpp, "finetune") == "tttpp-source"
    assert source_method_for(tttpp, "tttpp-source") == "tttpp-source"
    assert source_method_for(tent, "linear-probe") == "linear-probe"
    with pytest.raises(ConfigError, match="tttpp-source"):
        source_method_for(tttpp, "linear-probe")
    # TPT tunes a text prompt: a zero-shot source by default, CoOp's too, nothing else
    tpt = METHODS.get("tpt")()
    assert source_method_for(tpt, "finetune") == "zeroshot"
    assert source_method_for(tpt, "coop") == "coop"
    with pytest.raises(ConfigError, match=r"'zeroshot' or 'coop'.*not 'linear-probe'"):
        source_method_for(tpt, "linear-probe")


def test_tpt_on_a_source_it_cannot_adapt_fails_before_any_training(tmp_path):
    from clinadapt.preflight import check_run

    with pytest.raises(ConfigError, match="tpt needs its source trained by 'zeroshot' or 'coop'"):
        check_run(RunConfig(method="tpt", model="tiny-clip", source={"method": "linear-probe"}))
    # the default source of tpt is zero-shot: on a model without a text tower that fails at once
    cfg = RunConfig(method="tpt", data_options=SMALL, out_dir=str(tmp_path))
    with pytest.raises(IncompatibleError, match="zeroshot needs a CLIP-like model"):
        run_experiment(cfg)
    assert not list(tmp_path.rglob("fit-*")), "a source was trained before the error"


# --- runner and CLI ---------------------------------------------------------------------------
def test_runner_records_clinical_metrics_and_resets(tmp_path):
    rec = run_experiment(
        RunConfig(
            method="tent",
            data_options=SMALL,
            out_dir=str(tmp_path),
            source=QUICK_SOURCE,
            tta_protocol="continual",
            stream_order="class-sorted",
        )
    )
    assert rec["tta"]["protocol"] == "continual" and rec["tta"]["stream_order"] == "class-sorted"
    assert rec["tta"]["resets"] == sum(s["resets"] for s in rec["tta"]["per_set"].values())
    assert rec["target"]["spec"] == "norm"
    for m in rec["metrics"].values():
        for key in ("accuracy", "balanced_accuracy", "auroc", "ece"):
            assert key in m
    on_disk = json.loads((tmp_path / f"{rec['run_id']}.json").read_text())
    assert on_disk["config"]["tta_protocol"] == "continual"


def test_cli_runs_a_tta_method_with_protocol_options(tmp_path):
    from clinadapt.cli import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            "--method",
            "t3a",
            "--out",
            str(tmp_path),
            "--json",
            "-o",
            "data_options.patients_per_site=12",
            "-o",
            "source.options.epochs=1",
            "-o",
            "tta_protocol=episodic",
            "-o",
            "stream_order=imbalanced",
        ],
    )
    assert result.exit_code == 0, result.output
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert rec["tta"]["protocol"] == "episodic" and rec["method"]["name"] == "t3a"
    bad = CliRunner().invoke(app, ["run", "--method", "tent", "-o", "tta_protocol=sometimes"])
    assert bad.exit_code != 0


E2E = [("tiny-resnet", m) for m in ("eata", "sar", "memo", "t3a", "vnl", "tttpp")] + [
    ("tiny-vit", m) for m in ("sar", "t3a", "vnl", "tttpp")
]


@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "method"), E2E)
def test_every_method_runs_end_to_end(tmp_path_factory, model_name, method):
    """Each method adapts: on the same streams, in the same order, its predictions differ from
    those of the source model it starts from; the record's metrics are those of its
    predictions."""
    from clinadapt.evaluation.metrics import compute_metrics

    out = tmp_path_factory.getbasetemp() / f"tta-e2e-{model_name}"
    source = {**QUICK_SOURCE, "method": "tttpp-source"} if method == "tttpp" else QUICK_SOURCE
    common = dict(
        model=model_name,
        data_options={"patients_per_site": 8},
        out_dir=str(out),
        source=source,
        evaluation={"n_boot": 0},
        # several batches per test set (14-19 images each): a method predicts each batch before
        # its update, so on a LayerNorm model a one-batch stream shows no adaptation at all.
        # The stream's batch is stream_batch_size (batch_size is the source's training batch).
        stream_batch_size=8,
    )
    options = {"memo": {"augmentations": 4}}.get(method, {})
    rec = run_experiment(RunConfig(method=method, method_options=options, **common))
    batches = {name: s["batches"] for name, s in rec["tta"]["per_set"].items()}
    sizes = rec["tta"]["stream_sizes"]
    assert all(batches[n] == -(-sizes[n] // 8) for n in sizes), (batches, sizes)
    assert max(batches.values()) >= 2, batches  # the premise: some set has a later batch
    base = run_experiment(RunConfig(method="source", **common))
    assert base["source"]["training"].get("reused")  # the very source model the method adapted
    adapted = np.load(out / "predictions" / f"{rec['run_id']}.npz")
    plain = np.load(out / "predictions" / f"{base['run_id']}.npz")
    change = 0.0
    for name, metrics in rec["metrics"].items():
        p, y = adapted[f"probs/{name}"], adapted[f"labels/{name}"]
        np.testing.assert_array_equal(y, plain[f"labels/{name}"])  # the same stream
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        change = max(change, float(np.abs(p - plain[f"probs/{name}"]).max()))
        again = compute_metrics(y, p)
        for key in ("accuracy", "balanced_accuracy", "ece"):
            assert metrics[key] == pytest.approx(again[key]), (name, key)
    assert change > 1e-6, f"{method} left every prediction of the source model unchanged"
    if method == "tttpp":
        assert rec["source"]["method"] == "tttpp-source"


@pytest.mark.slow
def test_bn_and_tent_improve_balanced_accuracy_on_unseen_sites(tmp_path):
    """The built-in shift is measurable and test-time adaptation recovers from it: trained on
    site-a, the source model is good on held-out site-a and drops on every other site; bn and
    tent, adapting that very model on each unlabelled stream, beat it on sites b-d."""
    common = dict(
        data_options={"patients_per_site": PATIENTS},
        shift_options={"target_split": "test"},
        source={"options": {"epochs": EPOCHS}},
        out_dir=str(tmp_path),
    )
    shifted = {}
    for method in ("source", "bn", "tent"):
        rec = run_experiment(RunConfig(method=method, **common), write=False)
        shifted[method] = rec["summary"]["balanced_accuracy"]["shifted"]
        assert rec["tta"]["resets"] == 0
        if method == "source":
            ba = {k: v["balanced_accuracy"] for k, v in rec["metrics"].items()}
            assert ba["site-a"] > 0.7, ba  # chance is 0.25
            for site in ("site-b", "site-c", "site-d"):
                assert ba[site] < ba["site-a"] - 0.08, ba
        else:
            assert rec["source"]["training"].get("reused"), "the same source model is adapted"
    assert shifted["bn"] > shifted["source"] + 0.05, shifted
    assert shifted["tent"] > shifted["source"] + 0.05, shifted


def test_tent_adapts_a_lora_target_on_a_vit(tmp_path):
    """Tent on `lora`: only the injected low-rank factors move, and predictions change."""
    common = dict(
        model="tiny-vit",
        data_options=SMALL,
        out_dir=str(tmp_path),
        source=QUICK_SOURCE,
        stream_batch_size=8,  # tent predicts each batch before its update: several per set
    )
    src = run_experiment(RunConfig(method="source", **common))
    rec = run_experiment(
        RunConfig(method="tent", target="lora", target_options={"rank": 2}, **common)
    )
    assert rec["target"]["spec"] == "lora"
    # tiny-vit: depth 2, dim 64, fused qkv 64 -> 192: rank 2 gives 2 * (64 + 192) per block
    assert rec["target"]["trainable"] == 2 * 2 * (64 + 192)
    a = np.load(tmp_path / "predictions" / f"{src['run_id']}.npz")
    b = np.load(tmp_path / "predictions" / f"{rec['run_id']}.npz")
    pa, pb = a["probs/site-b"], b["probs/site-b"]
    np.testing.assert_allclose(pa[:8], pb[:8], atol=1e-6)  # the first batch: LoRA B still zero
    assert not np.allclose(pa[8:], pb[8:])  # later batches: the low-rank update moved
    np.testing.assert_array_equal(a["labels/site-b"], b["labels/site-b"])


def test_single_label_methods_refuse_multilabel_data_before_the_source_trains(tmp_path):
    """Entropy, filters and caches over a softmax do not apply to multi-label sigmoids: said at
    once, not after the source model has trained."""
    from clinadapt.data.base import ArraySource, ClinicalDataset

    rng = np.random.default_rng(0)
    labels = (rng.random((60, 3)) < 0.4).astype(np.int64)
    images = rng.integers(0, 255, (60, 16, 16)).astype(np.uint8)
    ds = ClinicalDataset("toy-ml", ArraySource(images), labels, ["a", "b", "c"], "multilabel")
    for name in ("tent", "sar", "tda"):
        assert METHODS.get(name).single_label
        cfg = RunConfig(method=name, shift="none", out_dir=str(tmp_path))
        with pytest.raises(IncompatibleError, match=f"{name}: .*single-label.*toy-ml.*multi-label"):
            run_experiment(cfg, dataset=ds)
    assert not list(tmp_path.rglob("fit-*")), "a source was trained before the refusal"
    assert not METHODS.get("bn").single_label  # normalisation statistics need no softmax
