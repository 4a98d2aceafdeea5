"""3D self-supervised pre-training: masked-volume autoencoding and 3D SimCLR through the same
trainer as 2D (resume, weights that load_model reads back, probe/kNN summary)."""

import pytest
import torch
from safetensors.torch import load_file

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.models import load_model
from clinadapt.ssl import SSL_METHODS, make_config, pretrain
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.volume import (
    cube_mask,
    intensity_jitter,
    random_axis_flips,
    random_box_crop,
)

DATA = {"patients_per_site": 5}
TINY_OPTIONS = {"mae-3d": {"mask_patch": 8}, "simclr-3d": {"proj_dim": 8}}


def cfg(tmp_path, name="run", **kw):
    base = dict(
        model="tiny-resenc",
        model_options={"volume_size": 16},
        method="mae-3d",
        method_options=TINY_OPTIONS["mae-3d"],
        data="clinical-shift-3d",
        data_options=DATA,
        max_steps=4,
        batch_size=4,
        checkpoint_every=2,
        out_dir=str(tmp_path / name),
        eval_baseline=False,
        evaluate=False,
    )
    return make_config(**{**base, **kw})


@pytest.mark.parametrize("method", ["mae-3d", "simclr-3d"])
def test_3d_pretraining_resumes_where_it_stopped_and_matches(tmp_path, monkeypatch, method):
    opts = {"method": method, "method_options": TINY_OPTIONS[method]}
    full = pretrain(cfg(tmp_path, "full", **opts))
    assert full["steps"] == 4 and all(map(torch.isfinite, torch.tensor([full["loss_first"]])))
    cls = SSL_METHODS.get(method)
    original = cls.after_step

    def crash(self, step, total):
        if step == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint
        original(self, step, total)

    monkeypatch.setattr(cls, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg(tmp_path, "cut", **opts))
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    monkeypatch.setattr(cls, "after_step", original)
    resumed = pretrain(cfg(tmp_path, "cut", **opts))
    assert resumed["steps"] == 4 and resumed["loss_first"] == full["loss_first"]
    a, b = load_file(full["weights"]), load_file(resumed["weights"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # the written encoder is what load_model reads back, and it moved from the initialisation
    again = load_model("tiny-resenc", weights=full["weights"], volume_size=16)
    for k, v in again.image_encoder.state_dict().items():
        torch.testing.assert_close(v, a[k])
    init = load_model("tiny-resenc", volume_size=16).image_encoder.state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if a[k].is_floating_point())


def test_3d_pretraining_summary_has_the_probe_and_knn(tmp_path):
    s = pretrain(cfg(tmp_path, method="simclr-3d", method_options={"proj_dim": 8}, evaluate=True))
    ev = s["eval"]
    assert {"linear_probe", "knn"} <= set(ev) and s["data"]["unlabelled_images"] > 0


def test_2d_and_3d_methods_refuse_the_other_kind_of_data(tmp_path):
    with pytest.raises(
        ConfigError, match=r"'simclr' is for 2D images.*holds volumes; use mae-3d or simclr-3d"
    ):
        pretrain(cfg(tmp_path, "a", method="simclr", method_options={}))
    with pytest.raises(ConfigError, match="'mae-3d' is for volumes"):
        pretrain(
            cfg(
                tmp_path,
                "b",
                model="tiny-vit",
                model_options={},
                data="clinical-shift",
                data_options={"patients_per_site": 5},
            )
        )
    with pytest.raises(IncompatibleError, match=r"2D backbone, but .* holds volumes"):
        pretrain(cfg(tmp_path, "c", model="tiny-resnet", model_options={}))


def test_mask_covers_the_asked_share_of_whole_cubes():
    m = cube_mask((16, 16, 24), 8, 0.75, ImageDraws.seeded(0, 3))
    assert m.shape == (3, 1, 16, 16, 24)
    # 2 x 2 x 3 = 12 cubes, 9 masked: 9 * 512 voxels per volume, each cube all or nothing
    assert m.sum(dim=(1, 2, 3, 4)).tolist() == [9 * 512] * 3
    cubes = m[:, 0].reshape(3, 2, 8, 2, 8, 3, 8).float().mean(dim=(2, 4, 6))
    assert set(cubes.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(m[0], m[1])  # each volume its own draw


def test_3d_views_keep_shape_range_and_follow_the_generator():
    x = torch.rand(2, 1, 16, 16, 16)
    gen = ImageDraws.seeded(1, 2)
    v = intensity_jitter(
        random_axis_flips(random_box_crop(x, (16, 16, 16), (0.35, 1.0), gen), gen), gen
    )
    assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1
    gen2 = ImageDraws.seeded(1, 2)
    w = intensity_jitter(
        random_axis_flips(random_box_crop(x, (16, 16, 16), (0.35, 1.0), gen2), gen2), gen2
    )
    torch.testing.assert_close(v, w)
    # a whole-volume crop is the volume itself; flips with p=1 reverse every axis
    same = random_box_crop(x, (16, 16, 16), (1.0, 1.0), ImageDraws.seeded(0, 2))
    torch.testing.assert_close(same, x)
    flipped = random_axis_flips(x, ImageDraws.seeded(0, 2), p=1.0)
    torch.testing.assert_close(flipped, torch.flip(x, (2, 3, 4)))
