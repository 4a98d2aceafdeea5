"""Seeded end to end: a 3D model trained on one site of the built-in volumes drops on the other
sites, and test-time BatchNorm statistics (seg3d-bn) and Tent on voxel logits (seg3d-tent)
recover part of the drop."""

import numpy as np
import pytest
import torch

from clinadapt.config import RunConfig
from clinadapt.runner import run_experiment

SHIFTED = ("site-b", "site-c", "site-d")


@pytest.fixture
def two_threads():
    """float32 sums depend on how many threads split them, and 15 epochs at lr 1e-2 amplify that:
    the figures below were measured with two (torch's default on a 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_a_3d_model_drops_on_other_sites_and_bn_and_tent_recover_part(tmp_path, two_threads):
    """24^3 volumes, 15 patients per site, tiny-resenc (BatchNorm) trained 15 epochs on site A;
    organ Dice and NSD (2 mm at the volumes' 6.7 mm spacing) per site."""

    def run(method: str, **kw) -> dict:
        cfg = RunConfig(
            data="clinical-shift-3d-seg",
            data_options={"patients_per_site": 15, "size": 24},
            model="tiny-resenc",
            model_options={"volume_size": 24},
            method=method,
            shift="domain",
            out_dir=str(tmp_path),  # the TTA runs reuse the source fit from the cache
            seed=0,
            batch_size=2,
            stream_batch_size=4,
            device="cpu",
            **kw,
        )
        r = run_experiment(cfg, write=False)
        return {s: (m["dice_present/organ"], m["nsd/organ"]) for s, m in r["metrics"].items()}

    fit = {"epochs": 15, "lr": 1e-2}
    source = run("seg3d-finetune", method_options=fit)
    bn = run("seg3d-bn", source={"options": fit})
    tent = run("seg3d-tent", source={"options": fit})

    def shifted(scores: dict, k: int) -> float:
        return float(np.mean([scores[s][k] for s in SHIFTED]))

    for k in (0, 1):  # Dice, NSD
        in_domain = source["site-a"][k]
        drop = in_domain - shifted(source, k)
        assert drop > 0.03, (k, source)  # the shifted sites score below the training site
        if k == 0:  # Dice on each site; NSD at 2 mm on 6.7 mm voxels is too coarse per site
            assert all(source[s][k] < in_domain for s in SHIFTED), (k, source)
        for adapted in (bn, tent):
            recovered = shifted(adapted, k) - shifted(source, k)
            assert 0 < recovered < drop, (k, source, adapted)  # part of the drop, not all
