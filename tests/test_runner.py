"""End-to-end runs on the built-in data with the tiny default backbone."""

import json

import numpy as np
import pytest
import torch

from clinadapt.classifier import ImageClassifier
from clinadapt.config import RunConfig
from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.evaluation.report import write_report
from clinadapt.methods import Context, predict_proba
from clinadapt.methods.logistic import logistic_path
from clinadapt.methods.tta.bn import replace_batchnorm
from clinadapt.models import load_model
from clinadapt.runner import run_experiment
from clinadapt.store import list_records
from clinadapt.targets import apply_target, count_parameters

SMALL = {"patients_per_site": 60}


def test_head_and_full_targets_count_by_hand():
    model = ImageClassifier(load_model("tiny-resnet"), 4)
    d = model.encoder.feature_dim
    info = apply_target(model, "head")
    assert info.trainable == d * 4 + 4
    assert info.total == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"head.weight", "head.bias"}
    info = apply_target(model, "full")
    assert info.trainable == info.total == count_parameters(model)[1]
    with pytest.raises(ConfigError, match="twice"):
        apply_target(model, "head+head")


def test_linear_probe_head_reproduces_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = rng.integers(0, 3, 60)
    for classes in (3, 2):
        yy = y % classes
        lr = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x, yy)
        (fit,) = logistic_path(x, yy, classes + 1, [1.0])  # one class absent from training
        logits = fit.logits(x)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(p[:, :classes], lr.predict_proba(x), atol=1e-6)
        assert p[:, classes].max() < 1e-12


def test_bn_uses_batch_statistics_blended_with_prior():
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    net = torch.nn.Sequential(bn)
    replace_batchnorm(net, prior=0.25)
    x = torch.randn(8, 3, 5, 5) * 3 + 2
    mean = 0.25 * 1.0 + 0.75 * x.mean((0, 2, 3))
    # the unbiased batch variance, as Schneider et al.'s code blends it
    var = 0.25 * 4.0 + 0.75 * x.var((0, 2, 3), unbiased=True)
    ref = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(net(x), ref)


def test_run_record_contents_and_reuse(tmp_path):
    cfg = RunConfig(
        method="finetune", data_options=SMALL, out_dir=str(tmp_path), method_options={"epochs": 2}
    )
    rec = run_experiment(cfg)
    path = tmp_path / f"{rec['run_id']}.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["run_id"] == cfg.run_id()
    for key in (
        "config",
        "seed",
        "versions",
        "data",
        "shift",
        "model",
        "target",
        "metrics",
        "summary",
        "timings",
    ):
        assert key in on_disk
    assert on_disk["versions"]["torch"].startswith("2.14")
    assert on_disk["target"]["trainable"] == on_disk["target"]["total"] > 0
    assert set(on_disk["metrics"]) == {"site-a", "site-b", "site-c", "site-d"}
    for v in on_disk["metrics"].values():
        assert 0 <= v["balanced_accuracy"] <= 1 and 0 <= v["ece"] <= 1
    preds = np.load(tmp_path / "predictions" / f"{rec['run_id']}.npz")
    assert preds["probs/site-b"].shape == (int(on_disk["metrics"]["site-b"]["n"]), 4)
    # the metrics in the record are those of the stored predictions
    from clinadapt.evaluation.metrics import compute_metrics

    again = compute_metrics(preds["labels/site-b"], preds["probs/site-b"])
    assert again["accuracy"] == pytest.approx(on_disk["metrics"]["site-b"]["accuracy"])
    # a test-time method reuses the trained source model and gives the same numbers for 'source'
    src = run_experiment(
        RunConfig(
            method="source",
            data_options=SMALL,
            out_dir=str(tmp_path),
            source={"options": {"epochs": 2}},
        )
    )
    assert src["source"]["training"]["reused"]
    assert src["metrics"]["site-c"]["accuracy"] == pytest.approx(
        rec["metrics"]["site-c"]["accuracy"]
    )
    html = write_report(tmp_path).html
    assert html.exists() and "data:image/png;base64" in html.read_text()
    assert (tmp_path / "report.md").read_text().count("|") > 10
    assert len(list_records(tmp_path)) == 2


def test_linear_probe_run_and_predict(tmp_path):
    rec = run_experiment(
        RunConfig(method="linear-probe", data_options=SMALL, out_dir=str(tmp_path))
    )
    assert rec["target"]["spec"] == "head"
    assert rec["training"]["C"] in [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    ds = make_clinical_shift(patients_per_site=10)
    model = ImageClassifier(load_model("tiny-resnet"), 4)
    p = predict_proba(model, ds, Context(batch_size=16))
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


def test_bad_combinations(tmp_path):
    with pytest.raises(IncompatibleError, match="BatchNorm"):
        run_experiment(
            RunConfig(
                model="tiny-vit",
                method="bn",
                data_options=SMALL,
                out_dir=str(tmp_path),
                source={"options": {"epochs": 1}},
            )
        )
    with pytest.raises(ConfigError, match="unknown option 'epoch'; did you mean 'epochs'"):
        run_experiment(
            RunConfig(
                method="finetune",
                method_options={"epoch": 3},
                data_options=SMALL,
                out_dir=str(tmp_path),
            )
        )
    with pytest.raises(ConfigError, match="test-time"):
        run_experiment(
            RunConfig(
                method="bn", source={"method": "source"}, data_options=SMALL, out_dir=str(tmp_path)
            )
        )


def test_evaluation_settings_reach_the_record(tmp_path):
    common = dict(data_options=SMALL, out_dir=str(tmp_path), method_options={"epochs": 1})
    off = run_experiment(
        RunConfig(method="finetune", evaluation={"n_boot": 0, "subgroup_keys": ["sex"]}, **common)
    )
    assert "ci" not in off
    assert all(set(v) == {"sex"} for v in off["subgroups"].values())
    on = run_experiment(
        RunConfig(method="finetune", evaluation={"n_boot": 30, "alpha": 0.2}, **common)
    )
    ci = on["ci"]["site-b"]
    assert ci["alpha"] == 0.2 and ci["unit"] == "patient"
    assert set(on["subgroups"]["site-b"]) >= {"sex", "age_group"}
    from clinadapt.config import load_config

    with pytest.raises(ConfigError, match="n_boot"):
        load_config(None, **{"evaluation.n_boot": -1})


def test_other_weights_at_the_same_path_are_not_a_reused_fit(tmp_path):
    """A pre-training resumed for more steps rewrites backbone.safetensors in place: a run
    with --weights at that path must train on the new weights, not reuse the old fit."""
    from clinadapt.ssl.checkpoint import save_backbone

    backbone = load_model("tiny-resnet")
    path = save_backbone(backbone, "tiny-resnet", tmp_path / "pretrain")
    cfg = RunConfig(
        method="linear-probe",
        weights=str(path),
        data_options={"patients_per_site": 8},
        out_dir=str(tmp_path / "runs"),
    )
    from clinadapt.sweep import is_done

    first = run_experiment(cfg)
    assert first["weights_files"] and is_done(cfg)
    assert run_experiment(cfg, write=False)["training"].get("reused")  # the same file: reused
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05)
    save_backbone(backbone, "tiny-resnet", tmp_path / "pretrain")  # same path, same size
    assert not is_done(cfg)  # a resumed sweep runs it again rather than keep the old record
    again = run_experiment(cfg, write=False)
    assert "reused" not in again["training"]
    assert again["training"]["checkpoint"] != first["training"]["checkpoint"]
    assert again["weights_files"] != first["weights_files"]
