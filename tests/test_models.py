"""The model registry: every family on its tiny configuration, local weights, offline errors."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clinadapt.errors import IncompatibleError, RegistryError, WeightsUnavailableError
from clinadapt.models import MODELS, get_spec, list_models, load_model
from clinadapt.models.base import LUMA_WEIGHTS, Preprocessing, adapt_channels

ALL_TINY = [n for n in list_models() if n.startswith("tiny-")]
# 2D models; the 3D backbones (family "volume") are tested in test_volume_models.py
TINY = [n for n in ALL_TINY if MODELS.get(n).family != "volume"]


def test_every_family_has_a_tiny_configuration():
    families = {MODELS.get(n).family for n in ALL_TINY}
    assert families == {"timm", "open_clip", "hf", "volume"}
    assert {"tiny-resnet", "tiny-vit", "tiny-swin", "tiny-clip", "tiny-hf-clip", "tiny-sam"} <= set(
        TINY
    )
    # the names a user would type are registered
    for name in ("clip-vit-b16", "biomedclip", "dinov2-vits14", "mae-vit-b16", "resnet50"):
        assert name in MODELS
    for name in ("swin-t", "vit-b16", "sam-vit-b", "medsam"):
        assert name in MODELS


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_shapes_and_preprocessing(name):
    model = load_model(name)
    pp = model.preprocess
    assert not model.training
    h, w = pp.image_size
    imgs = np.random.default_rng(0).integers(0, 256, (3, 40, 48), dtype=np.uint8)  # grey, odd size
    x = pp(imgs)
    assert x.shape == (3, pp.in_chans, h, w)
    with torch.no_grad():
        f = model.encode_image(x)
    assert f.shape == (3, model.feature_dim)
    assert torch.isfinite(f).all()
    # a random initialisation still tells images apart (features usable for training)
    assert (f - f.mean(0)).abs().mean() > 1e-3 * max(f.abs().mean().item(), 1e-3)
    # the same name builds the same random initialisation
    again = load_model(name)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), f)
    desc = model.describe()
    assert desc["parameters"] == sum(p.numel() for p in model.parameters())
    assert desc["feature_dim"] == model.feature_dim
    if MODELS.get(name).text:
        with torch.no_grad():
            t = model.encode_text(["a chest x-ray", "an effusion", "a nodule"])
        assert t.shape == (3, model.feature_dim)
        assert model.logit_scale > 0
    else:
        assert not model.has_text
        with pytest.raises(IncompatibleError, match="no text tower"):
            model.encode_text(["x"])


def test_preprocessing_normalises_with_the_model_statistics():
    pp = Preprocessing(image_size=(4, 4), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), in_chans=3)
    img = np.full((1, 4, 4), 255, dtype=np.uint8)
    x = pp(img)
    expected = [(1 - 0.5) / 0.2, (1 - 0.4) / 0.25, (1 - 0.3) / 0.5]
    for c, v in enumerate(expected):
        assert torch.allclose(x[0, c], torch.full((4, 4), v))


def test_grey_rgb_channel_rule():
    grey = torch.rand(2, 1, 5, 5)
    rgb = adapt_channels(grey, 3)
    assert rgb.shape == (2, 3, 5, 5)
    assert torch.equal(rgb[:, 0], rgb[:, 2]) and torch.equal(rgb[:, 0], grey[:, 0])
    colour = torch.rand(2, 3, 5, 5)
    luma = adapt_channels(colour, 1)
    w = LUMA_WEIGHTS
    ref = w[0] * colour[:, 0] + w[1] * colour[:, 1] + w[2] * colour[:, 2]
    torch.testing.assert_close(luma[:, 0], ref)
    rgba = torch.rand(1, 4, 5, 5)
    assert torch.equal(adapt_channels(rgba, 3), rgba[:, :3])
    with pytest.raises(Exception, match="2 channels but the model takes 3"):
        adapt_channels(torch.rand(1, 2, 5, 5), 3)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(RegistryError, match="tiny-resnet"):
        load_model("tiny-resnett")
    with pytest.raises(RegistryError, match="resnet18"):
        get_spec("timm:resnet18x")


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("resnet50", "model.safetensors"),
        ("dinov2-vits14", "model.safetensors"),
        ("clip-vit-b16", "open_clip"),
        ("hf-dinov2-vits14", "config.json"),
    ],
)
def test_offline_without_weights_fails_fast_and_says_what_to_fetch(
    name, files, tmp_path, monkeypatch
):
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CLINADAPT_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        load_model(name)
    assert time.perf_counter() - start < 30  # no network retries
    msg = str(info.value)
    assert name in msg and "not available offline" in msg
    assert files in msg
    assert "hf download" in msg and str(tmp_path / "models") in msg
    assert "pretrained=False" in msg


def test_timm_weights_from_model_dir_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = load_model("timm:resnet10t", pretrained=False)
    with torch.no_grad():  # make the weights differ from the seeded random initialisation
        for p in ref.image_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in ref.image_encoder.state_dict().items()}
    folder = tmp_path / get_spec("timm:resnet10t").dir_name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    from_dir = load_model("timm:resnet10t")
    from_file = load_model("timm:resnet10t", weights=folder / "model.safetensors")
    assert "model dir" in from_dir.source and "file" in from_file.source
    with torch.no_grad():
        torch.testing.assert_close(from_dir.encode_image(x), ref.encode_image(x))
        torch.testing.assert_close(from_file.encode_image(x), ref.encode_image(x))
    # a checkpoint of another architecture does not load silently
    other = load_model("tiny-resnet").image_encoder.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(Exception, match=r"(?i)size|fit|missing"):
        load_model("timm:resnet10t", weights=tmp_path / "other.safetensors")


def test_hf_model_from_local_directory(tmp_path):
    tiny = load_model("tiny-dinov2")
    lib = tiny.image_encoder
    lib.save_pretrained(tmp_path / "dinov2")
    again = load_model(f"hf:{tmp_path / 'dinov2'}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), tiny.encode_image(x))
    assert again.feature_dim == tiny.feature_dim


def test_weights_and_pretrained_false_conflict(tmp_path):
    from clinadapt.errors import ConfigError

    with pytest.raises(ConfigError, match="pretrained=False"):
        load_model("resnet50", weights=tmp_path, pretrained=False)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_model("resnet50", weights=tmp_path / "missing.safetensors")


def test_tiny_resnet_is_as_narrow_as_its_description():
    """No layer of tiny-resnet is wider than 16 channels before its second stage."""
    net = load_model("tiny-resnet").image_encoder
    assert "16-128 channels" in MODELS.get("tiny-resnet").description
    seen: list[int] = []
    handle = net.maxpool.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        net.forward_features(torch.zeros(1, 3, 64, 64))
    handle.remove()
    assert seen == [16]  # the pooled stem output feeds layer1 (16 channels) without a projection
    stem_and_stage1 = [net.conv1, net.layer1]
    convs = [
        m for part in stem_and_stage1 for m in part.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    assert max(c.out_channels for c in convs) == 16
    assert net.layer1[0].downsample is None


def test_grey_images_resize_once_then_replicate_into_rgb():
    """Resizing the one grey channel and then replicating it gives exactly the RGB result."""
    pp = Preprocessing(image_size=(24, 20), in_chans=3)
    grey = np.random.default_rng(1).integers(0, 256, (3, 40, 33), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    x = pp(grey)
    assert x.shape == (3, 3, 24, 20)
    assert torch.equal(x, pp(rgb))
    assert torch.equal(pp(list(grey)), x)
