"""3D classification through the runner: fine-tuning and test-time adaptation on volumes, a 2D
backbone on volumes slice by slice, 3D artefact shifts, and the dimensionality checks."""

import numpy as np
import pytest
import torch

from clinadapt.config import RunConfig
from clinadapt.data import load_dataset
from clinadapt.errors import IncompatibleError
from clinadapt.methods.tta.bn import BatchStatsNorm
from clinadapt.runner import build_classifier, run_experiment
from clinadapt.shifts import apply_shift

DATA = {"patients_per_site": 5}
TINY = {"volume_size": 16}


def config(tmp_path, **kw):
    base = dict(
        data="clinical-shift-3d",
        data_options=DATA,
        model="tiny-resenc",
        model_options=TINY,
        method="finetune",
        method_options={"epochs": 1},
        shift="domain",
        out_dir=str(tmp_path),
        batch_size=4,
        stream_batch_size=4,
        device="cpu",
    )
    return RunConfig(**{**base, **kw})


def test_finetuning_a_3d_backbone_scores_every_site_per_volume(tmp_path):
    r = run_experiment(config(tmp_path))
    split = apply_shift(load_dataset("clinical-shift-3d", **DATA), "domain", seed=0)
    assert set(r["metrics"]) == set(split.tests) == {"site-a", "site-b", "site-c", "site-d"}
    assert r["model"]["spatial_dims"] == 3 and r["model"]["arch"]["arch"] == "resenc"
    clf = build_classifier(config(tmp_path), 2)
    assert r["target"]["trainable"] == sum(p.numel() for p in clf.parameters())
    preds = np.load(tmp_path / "predictions" / f"{r['run_id']}.npz")
    for name, test in split.tests.items():  # one prediction per volume, patient-level CIs
        assert preds[f"probs/{name}"].shape == (len(test), 2)
        assert "balanced_accuracy" in r["ci"][name]


@pytest.mark.parametrize("method", ["bn", "tent", "eata", "sar"])
def test_test_time_methods_adapt_a_3d_backbone(tmp_path, method):
    cfg = config(tmp_path, method=method, method_options={}, source={"options": {"epochs": 1}})
    r = run_experiment(cfg)
    assert r["method"]["kind"] == "tta" and r["model"]["spatial_dims"] == 3
    assert set(r["vs_source"]) == set(r["metrics"])
    per_set = r["tta"]["per_set"]
    assert all(v["batches"] >= 1 for v in per_set.values())
    if method != "bn":  # gradient methods open the 3D BatchNorm affine parameters (Tent's norm)
        clf = build_classifier(cfg, 2)
        norms = sum(
            p.numel()
            for m in clf.encoder.modules()
            if isinstance(m, torch.nn.BatchNorm3d)
            for p in m.parameters()
        )
        assert r["target"]["trainable"] == norms > 0


def test_bn_normalises_3d_batchnorm_with_the_test_batch():
    from clinadapt.methods.tta.bn import replace_batchnorm

    clf = build_classifier(
        RunConfig(model="tiny-resenc", model_options=TINY, data="clinical-shift-3d", device="cpu"),
        2,
    )
    n = replace_batchnorm(clf, prior=0.0)
    assert n == sum(isinstance(m, BatchStatsNorm) for m in clf.modules()) > 0
    layer = next(m for m in clf.modules() if isinstance(m, BatchStatsNorm))
    x = torch.randn(3, layer.source_mean.numel(), 4, 4, 4) * 5 + 2
    # by hand: per channel over the batch and the three spatial axes, biased variance
    mean = x.mean(dim=(0, 2, 3, 4), keepdim=True)
    var = x.var(dim=(0, 2, 3, 4), unbiased=False, keepdim=True)
    w, b = layer.weight.view(1, -1, 1, 1, 1), layer.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(layer(x), (x - mean) / torch.sqrt(var + layer.eps) * w + b)


def test_a_2d_backbone_runs_on_volumes_slice_by_slice(tmp_path):
    r = run_experiment(config(tmp_path, model="slices:tiny-resnet", model_options={"slices": 4}))
    assert set(r["metrics"]) == {"site-a", "site-b", "site-c", "site-d"}
    assert r["model"]["name"] == "slices:tiny-resnet"


def test_a_2d_backbone_on_volumes_is_refused_with_what_would_fit(tmp_path):
    with pytest.raises(
        IncompatibleError, match=r"'tiny-resnet' is a 2D backbone.*slices:tiny-resnet"
    ):
        run_experiment(config(tmp_path, model="tiny-resnet", model_options={}))
    with pytest.raises(IncompatibleError, match=r"is a 3D backbone, but .* holds 2D images"):
        run_experiment(
            config(tmp_path, data="clinical-shift", data_options={"patients_per_site": 5})
        )


def test_3d_artefact_shift_scores_each_severity(tmp_path):
    cfg = config(
        tmp_path,
        shift="corruption",
        shift_options={"corruptions": ["ct-noise-3d"], "severities": [1, 5]},
    )
    r = run_experiment(cfg)
    assert {"ct-noise-3d@1", "ct-noise-3d@5"} <= set(r["metrics"])
    assert np.isfinite(r["metrics"]["ct-noise-3d@5"]["balanced_accuracy"])
