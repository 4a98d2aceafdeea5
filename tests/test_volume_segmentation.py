"""3D segmentation: per-volume metrics in millimetres (checked against MONAI), the
sliding-window predictor, fine-tuning and test-time adaptation through the runner."""

import numpy as np
import pytest
import torch

from clinadapt.config import RunConfig
from clinadapt.errors import IncompatibleError
from clinadapt.evaluation.seg_metrics import score_image, score_images
from clinadapt.methods.seg3d import SlidingWindow, VolumeSegmenter, voxel_entropy
from clinadapt.models import load_model
from clinadapt.runner import run_experiment
from clinadapt.tasks.segmentation_3d import case_slice

DATA = {"patients_per_site": 5}


def config(tmp_path, **kw):
    base = dict(
        data="clinical-shift-3d-seg",
        data_options=DATA,
        model="tiny-resenc",
        model_options={"volume_size": 16},
        method="seg3d-finetune",
        method_options={"epochs": 1},
        shift="domain",
        out_dir=str(tmp_path),
        batch_size=2,
        stream_batch_size=2,
        device="cpu",
    )
    return RunConfig(**{**base, **kw})


def ball(shape, centre, radius):
    g = np.indices(shape)
    return sum((g[i] - centre[i]) ** 2 for i in range(3)) <= radius**2


def test_volume_metrics_match_monai_with_anisotropic_spacing():
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    shape, spacing = (24, 20, 16), (0.8, 1.0, 2.5)
    ref = ball(shape, (12, 10, 8), 6).astype(np.uint8)
    pred = ball(shape, (13, 10, 7), 5).astype(np.uint8)
    got = score_image(pred, ref, 1, spacing, tolerance_mm=2.0)
    p = torch.as_tensor(pred)[None, None].float()
    r = torch.as_tensor(ref)[None, None].float()
    bg = lambda t: torch.cat([1 - t, t], 1)  # noqa: E731
    assert got["dice"][0] == pytest.approx(
        compute_dice(bg(p), bg(r), include_background=False).item()
    )
    nsd = compute_surface_dice(bg(p), bg(r), [2.0], spacing=spacing, use_subvoxels=False).item()
    assert got["nsd"][0] == pytest.approx(nsd, abs=1e-6)
    hd = compute_hausdorff_distance(bg(p), bg(r), percentile=95, spacing=spacing).item()
    assert got["hd95"][0] == pytest.approx(hd, abs=1e-6)
    assert got["ref_area"][0] == ref.sum()
    # size bins of volumes: the diameter of the sphere of the reference's volume, in mm
    table = score_images([pred], [ref], np.array([spacing]), ["lesion"])
    mm3 = ref.sum() * np.prod(spacing)
    assert table.ref_diameter_mm()[0, 0] == pytest.approx(2 * (3 * mm3 / (4 * np.pi)) ** (1 / 3))


def test_sliding_windows_equal_one_pass_when_the_volume_is_the_patch_and_cover_larger_ones():
    torch.manual_seed(0)
    seg = VolumeSegmenter(load_model("tiny-resenc", volume_size=16), 2).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    sw = SlidingWindow()
    with torch.no_grad():
        torch.testing.assert_close(seg.logits(x, sw), seg(x))
        big = seg.logits(torch.randn(1, 1, 24, 20, 16), sw)
    assert tuple(big.shape) == (1, 3, 24, 20, 16) and torch.isfinite(big).all()
    with pytest.raises(IncompatibleError, match="3D backbone with a decoder"):
        VolumeSegmenter(load_model("tiny-resnet"), 2)


def test_voxel_entropy_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 2, 2, 1, 1)  # (N,C,X,Y,Z)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    h1 = -(p * p.log()).sum()
    assert voxel_entropy(logits).item() == pytest.approx(((h1 + np.log(2)) / 2).item())


def test_case_slice_is_the_one_with_most_reference():
    ref = np.zeros((4, 4, 5), np.uint8)
    ref[1:3, 1:3, 3] = 2
    ref[1, 1, 1] = 1
    assert case_slice(ref, np.zeros((2, 4, 4, 5), bool)) == 3
    pred = np.zeros((2, 4, 4, 5), bool)
    pred[0, :, :, 4] = True
    assert case_slice(np.zeros_like(ref), pred) == 4


def test_finetuning_segments_volumes_and_scores_them_per_volume(tmp_path):
    r = run_experiment(config(tmp_path))
    assert r["task"] == "segmentation-3d" and r["model"]["decoder"]["decoder"] == "random init"
    assert set(r["metrics"]) == {"site-a", "site-b", "site-c", "site-d"}
    for name, m in r["metrics"].items():
        assert {"dice", "nsd", "hd95", "dice/organ", "dice/lesion"} <= set(m)
        assert "dice" in r["ci"][name]
    arrays = np.load(tmp_path / "predictions" / f"{r['run_id']}.npz")
    image = arrays["cases/site-b/worst/image"]
    ref = arrays["cases/site-b/worst/reference"]
    pred = arrays["cases/site-b/worst/prediction"]
    assert image.dtype == np.uint8 and image.ndim == 2 and ref.shape == image.shape
    assert pred.shape == (2, *image.shape)
    assert arrays["table/site-b/spacing"].shape[1] == 3  # real voxel spacing per volume
    from clinadapt.evaluation.seg_overlays import overlay_figure, read_cases

    cases = {s: read_cases(arrays, s) for s in ("site-a", "site-b")}
    fig = overlay_figure(cases, ["organ", "lesion"])
    assert len(fig.axes) >= 6  # a slice picture per case: 2 sets x best/median/worst


def test_bn_with_the_source_statistics_scores_exactly_as_its_source(tmp_path):
    src = run_experiment(config(tmp_path))
    same = run_experiment(
        config(
            tmp_path,
            method="seg3d-bn",
            method_options={"prior": 1.0},
            source={"options": {"epochs": 1}},
        )
    )
    for name in src["metrics"]:
        assert same["metrics"][name]["dice"] == src["metrics"][name]["dice"], name
    assert same["target"]["trainable"] == 0 and same["source"]["training"]["reused"]
    for name, change in same["vs_source"].items():  # the unadapted source on the same volumes
        assert change["dice"]["change"] == 0.0, name


def test_tent_updates_norm_parameters_on_voxel_entropy(tmp_path):
    r = run_experiment(
        config(tmp_path, method="seg3d-tent", method_options={}, source={"options": {"epochs": 1}})
    )
    seg = VolumeSegmenter(load_model("tiny-resenc", volume_size=16), 2)
    norms = sum(
        p.numel()
        for m in seg.modules()
        if isinstance(m, torch.nn.BatchNorm3d)
        for p in m.parameters()
    )
    assert r["target"]["trainable"] == norms > 0
    per_set = r["tta"]["per_set"]
    assert all(v["updates"] == v["batches"] >= 1 for v in per_set.values())
    assert all(np.isfinite(v["mean_entropy"]) for v in per_set.values())


def test_wrong_pairings_are_refused(tmp_path):
    with pytest.raises(IncompatibleError, match="seg3d-bn needs BatchNorm"):
        run_experiment(
            config(
                tmp_path,
                model="tiny-stunet",
                method="seg3d-bn",
                method_options={},
                source={"options": {"epochs": 1}},
            )
        )
    with pytest.raises(IncompatibleError, match="is a segmentation-3d method"):
        run_experiment(config(tmp_path, data="clinical-shift-3d"))
    with pytest.raises(IncompatibleError, match="2D backbone"):
        run_experiment(config(tmp_path, model="tiny-resnet", model_options={}))


def test_3d_artefacts_shift_segmentation_volumes_and_keep_their_label_volumes(tmp_path):
    from clinadapt.data import load_dataset
    from clinadapt.shifts import apply_shift

    ds = load_dataset("clinical-shift-3d-seg", **DATA, size=16)
    split = apply_shift(ds, "corruption", corruptions=["ct-noise-3d"], severities=[5])
    clean, noisy = split.tests["clean"], split.tests["ct-noise-3d@5"]
    assert np.array_equal(clean.mask(0), noisy.mask(0))
    assert not np.array_equal(clean.volume(0), noisy.volume(0))
    r = run_experiment(
        config(
            tmp_path,
            data_options={**DATA, "size": 16},
            shift="corruption",
            shift_options={"corruptions": ["ct-noise-3d"], "severities": [5]},
        )
    )
    assert {"clean", "ct-noise-3d@5"} <= set(r["metrics"])


@pytest.mark.slow
def test_a_3d_segmentation_run_depends_on_its_seed_only(tmp_path):
    """The backbone and decoder start from the run's seed: what the process drew before (other
    runs, other tests) does not change the result."""

    def run(draw: int) -> dict:
        torch.manual_seed(draw)
        torch.rand(draw)
        cfg = RunConfig(
            data="clinical-shift-3d-seg",
            data_options={"patients_per_site": 5, "size": 16},
            model="tiny-resenc",
            model_options={"volume_size": 16},
            method="seg3d-finetune",
            method_options={"epochs": 1},
            shift="domain",
            out_dir=str(tmp_path / f"run{draw}"),
            seed=0,
            batch_size=2,
            device="cpu",
            evaluation={"n_boot": 0},
        )
        return run_experiment(cfg, write=False)["metrics"]

    assert run(1) == run(7)
