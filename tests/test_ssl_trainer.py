"""The pre-training loop: outputs, weights round trip, resume, --from, evaluation helpers."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.errors import ConfigError
from clinadapt.evaluation.metrics import balanced_accuracy
from clinadapt.models import load_model
from clinadapt.ssl import SSL_METHODS, make_config, pretrain, read_metadata, weights_path
from clinadapt.ssl.augment import Augmenter, policy_for_modality
from clinadapt.ssl.evaluate import knn_predict_proba, linear_probe, split_for_eval
from clinadapt.ssl.trainer import (
    batch_positions,
    load_images,
    lr_factor,
    make_optimizer,
    unlabelled_pool,
)

DATA = {"patients_per_site": 8}
SIMCLR = {"proj_dim": 16}
MAE = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
DINO = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2}
TINY_OPTIONS = {"simclr": SIMCLR, "dino": DINO, "mae": MAE}


def cfg(tmp_path, name="run", **kw):
    base = dict(
        model="tiny-vit",
        method="simclr",
        method_options=SIMCLR,
        data_options=DATA,
        max_steps=6,
        batch_size=16,
        checkpoint_every=3,
        out_dir=str(tmp_path / name),
        eval_baseline=False,
    )
    return make_config(**{**base, **kw})


def test_pretrain_writes_loadable_weights_and_summary(tmp_path):
    c = cfg(tmp_path, eval_baseline=True)
    s = pretrain(c)
    out = tmp_path / "run"
    assert (out / "checkpoint.pt").is_file() and (out / "summary.json").is_file()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == 6 and on_disk["completed"]
    assert s["images_per_second"] > 0 and len(on_disk["config"]) > 5
    for key in ("eval", "eval_baseline"):
        assert 0 <= s[key]["linear_probe"]["balanced_accuracy"] <= 1
        assert 0 <= s[key]["knn"]["balanced_accuracy"] <= 1
    meta = read_metadata(s["weights"])
    assert meta["clinadapt_model"] == "tiny-vit" and meta["ssl_method"] == "simclr"
    assert meta["steps"] == "6"
    # the weights load like any other checkpoint and differ from the random initialisation
    loaded = load_model("tiny-vit", weights=s["weights"])
    random_init = load_model("tiny-vit")
    saved = load_file(s["weights"])
    for k, v in loaded.image_encoder.state_dict().items():
        assert torch.equal(v, saved[k])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), random_init(x))


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_resume_continues_at_the_saved_step_and_matches(tmp_path, monkeypatch, method):
    opts = {"method": method, "method_options": TINY_OPTIONS[method], "evaluate": False}
    full = pretrain(cfg(tmp_path, "full", **opts))
    cls = SSL_METHODS.get(method)
    original = cls.after_step

    def crash(self, step, total):
        if step == 4:
            raise KeyboardInterrupt  # an interruption after the step-3 checkpoint
        original(self, step, total)

    monkeypatch.setattr(cls, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg(tmp_path, "cut", **opts))
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and len(state["history"]) == 3
    monkeypatch.setattr(cls, "after_step", original)
    resumed = pretrain(cfg(tmp_path, "cut", **opts))
    assert resumed["steps"] == 6
    assert resumed["loss_first"] == full["loss_first"]
    a, b = load_file(full["weights"]), load_file(resumed["weights"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the whole training state agrees too: heads, teacher, centre, optimiser moments
    sa = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    sb = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for k, v in sa["model"].items():
        assert torch.allclose(v.float(), sb["model"][k].float(), atol=1e-6), k
    assert sa["history"] == pytest.approx(sb["history"], rel=1e-5)
    # a different run may not resume from this folder
    with pytest.raises(ConfigError, match="different run"):
        pretrain(cfg(tmp_path, "cut", seed=1, **opts))


def test_from_continues_from_saved_weights(tmp_path):
    mae = {"method": "mae", "method_options": MAE, "evaluate": False}
    first = pretrain(cfg(tmp_path, "first", **mae))
    # a vanishing learning rate: the continued run must start where the first one ended
    c = cfg(tmp_path, "second", init_from=str(tmp_path / "first"), max_steps=1, lr=1e-12, **mae)
    second = pretrain(c)
    a, b = load_file(first["weights"]), load_file(second["weights"])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert read_metadata(second["weights"])["init_from"] == str(tmp_path / "first")
    with pytest.raises(ConfigError, match="no such file"):
        pretrain(cfg(tmp_path, "fourth", init_from=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match="tiny-dino"):
        pretrain(cfg(tmp_path, "third", model="tiny-dino", init_from=str(tmp_path / "first")))


def test_hf_backbone_round_trip(tmp_path):
    s = pretrain(cfg(tmp_path, model="tiny-dinov2", max_steps=2, evaluate=False))
    assert s["weights"].endswith("backbone")
    assert read_metadata(s["weights"])["clinadapt_model"] == "tiny-dinov2"
    m = load_model("tiny-dinov2", weights=s["weights"])
    assert "local dir" in m.source


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="max_steps"):
        make_config(max_steps=0)
    with pytest.raises(ConfigError, match="temperature"):
        pretrain(cfg(tmp_path, method_options={"temperature": -1}))


def test_lr_schedule_and_batches():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(32, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    seen = np.concatenate([batch_positions(10, 3, s, seed=0) for s in range(3)])
    assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 9  # one epoch
    assert not np.array_equal(batch_positions(10, 3, 0, 0), batch_positions(10, 3, 3, 0))
    assert np.array_equal(batch_positions(10, 3, 4, 0), batch_positions(10, 3, 4, 0))


def test_pool_and_image_loading():
    ds = make_clinical_shift(seed=0, patients_per_site=6)
    assert len(unlabelled_pool(ds, make_config(transductive=True))) == len(ds)
    only = unlabelled_pool(ds, make_config(domains=["site-b"], splits=["train"]))
    assert set(only.meta("domain")) == {"site-b"} and set(only.meta("split")) == {"train"}
    pp = load_model("tiny-vit").preprocess
    x = load_images(ds, np.arange(4), pp)
    assert x.shape == (4, 3, 64, 64) and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[0, 0], torch.as_tensor(ds.image(0)).float() / 255)
    # images much larger than the model are brought to twice its input side, keeping the aspect
    big = ClinicalDataset(
        "big", ArraySource(np.zeros((2, 200, 100), np.uint8)), np.array([0, 1]), ["a", "b"]
    )
    assert load_images(big, np.arange(2), pp).shape == (2, 3, 64, 32)


def test_pretraining_never_sees_the_probe_test_images_by_default():
    ds = make_clinical_shift(seed=0, patients_per_site=6)
    pool = unlabelled_pool(ds, make_config())
    assert set(pool.meta("split")) == {"train", "val"}
    assert len(pool) == int(np.isin(ds.meta("split"), ["train", "val"]).sum())
    with pytest.raises(ConfigError, match="transductive=true"):
        unlabelled_pool(ds, make_config(splits=["train", "test"]))
    with pytest.raises(ConfigError, match="not in"):
        unlabelled_pool(ds, make_config(splits=["training"]))
    everything = unlabelled_pool(ds, make_config(splits=["train", "test"], transductive=True))
    assert set(everything.meta("split")) == {"train", "test"}
    # without split metadata the pool is the train and val parts of the probe's seeded split
    bare = make_clinical_shift(seed=0, patients_per_site=6)
    bare.metadata.pop("split")
    _, _, test = split_for_eval(bare, seed=3)
    pool = unlabelled_pool(bare, make_config(seed=3))
    assert len(pool) + len(test) == len(bare)
    assert not set(pool.index) & set(test.index)


def test_summary_says_what_was_pretrained_on_and_where_the_probe_ran(tmp_path):
    s = pretrain(cfg(tmp_path, max_steps=1, eval_baseline=True))
    pool = s["data"]["pool"]
    assert pool["transductive"] is False and pool["test_images"] == 0
    assert set(pool["images_by_split"]) == {"train", "val"}
    for key in ("eval", "eval_baseline"):
        seen = s[key]["evaluated_on"]
        assert seen["split"] == "test" and seen["images"] == s[key]["images"]["test"]
        assert seen["pretrained_on_test_images"] == 0
    t = pretrain(cfg(tmp_path, name="transductive", max_steps=1, transductive=True))
    assert t["data"]["pool"]["transductive"] is True
    n_test = t["eval"]["images"]["test"]
    assert t["data"]["pool"]["test_images"] == n_test > 0
    assert t["eval"]["evaluated_on"]["pretrained_on_test_images"] == n_test
    assert t["config"]["transductive"] is True


def test_linear_probe_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 5)) * [1, 10, 1, 1, 1] + 3
    y = (x[:, 0] + 0.1 * x[:, 1] > 3).astype(int) + (x[:, 2] > 4)
    got = linear_probe(x[:50], y[:50], x[50:70], y[50:70], x[70:], y[70:], 3)
    sc = StandardScaler().fit(x[:50])
    xtr, xva = sc.transform(x[:50]), sc.transform(x[50:70])

    def val_score(c):
        clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, y[:50])
        return balanced_accuracy(y[50:70], clf.predict_proba(xva))

    best = max((1e-2, 1e-1, 1.0, 10.0, 100.0), key=val_score)
    clf = LogisticRegression(C=best, max_iter=2000).fit(sc.transform(x[:50]), y[:50])
    pred = clf.predict(sc.transform(x[70:]))
    assert got["C"] == best
    assert got["accuracy"] == pytest.approx(np.mean(pred == y[70:]))


def test_knn_weighted_vote_reference():
    rng = np.random.default_rng(1)
    xtr, ytr, xte = rng.normal(size=(30, 4)), rng.integers(0, 3, 30), rng.normal(size=(5, 4))
    got = knn_predict_proba(xtr, ytr, xte, 3, k=7, t=0.1)
    for i, q in enumerate(xte):
        sims = [q @ a / np.linalg.norm(q) / np.linalg.norm(a) for a in xtr]
        top = np.argsort(sims)[::-1][:7]
        votes = np.zeros(3)
        for j in top:
            votes[ytr[j]] += np.exp(sims[j] / 0.1)
        assert got[i] == pytest.approx(votes / votes.sum(), rel=1e-9)


def test_split_for_eval_without_split_metadata():
    ds = make_clinical_shift(seed=0, patients_per_site=10)
    ds.metadata.pop("split")
    tr, va, te = split_for_eval(ds, seed=0)
    assert len(tr) + len(va) + len(te) == len(ds)
    assert set(tr.index) & set(te.index) == set()
    assert set(np.unique(te.labels)) == set(np.unique(ds.labels))


def test_weights_paths_and_corrupt_checkpoint(tmp_path):
    s = pretrain(cfg(tmp_path, max_steps=1, evaluate=False))
    run = tmp_path / "run"
    assert weights_path(run) == run / "backbone.safetensors" == weights_path(s["weights"])
    with pytest.raises(ConfigError, match="no backbone weights"):
        weights_path(tmp_path)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        pretrain(cfg(tmp_path, max_steps=1, evaluate=False))


def test_optimizer_groups_and_default_lr():
    fm = load_model("tiny-vit")
    cls = SSL_METHODS.get("mae")
    aug = Augmenter(policy_for_modality("xray"), fm.preprocess.mean, fm.preprocess.std)
    m = cls(fm, cls.parse_options(MAE), aug)
    opt = make_optimizer(m, make_config(batch_size=128))
    decay, no_decay = opt.param_groups
    assert decay["lr"] == pytest.approx(1.5e-4 * 128 / 256)  # MAE's linear scaling rule
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(m.trainable_parameters())
    assert make_optimizer(m, make_config(lr=0.01, weight_decay=0.1)).param_groups[0]["lr"] == 0.01
