"""Model options: image_size for every family, builder arguments checked and recorded."""

import numpy as np
import pytest
import torch

from clinadapt.config import RunConfig
from clinadapt.errors import ConfigError
from clinadapt.models import load_model
from clinadapt.runner import run_experiment


def _forward(model):
    x = torch.zeros(2, model.preprocess.in_chans, *model.preprocess.image_size)
    with torch.no_grad():
        return model.encode_image(x)


def test_resnet_at_medmnist_resolution():
    """The MedMNIST v2 baseline: ResNet-18 on 28 px images (the size only resizes the input)."""
    model = load_model("timm:resnet18", pretrained=False, image_size=28)
    assert model.preprocess.image_size == (28, 28)
    assert _forward(model).shape == (2, 512)
    assert model.describe()["options"] == {"image_size": 28}
    grey = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    assert model.preprocess(grey).shape == (3, 3, 28, 28)  # no upsampling to 224


def test_a_resnet_refuses_img_size_and_says_what_it_takes():
    with pytest.raises(ConfigError) as err:
        load_model("timm:resnet18", img_size=28)
    msg = str(err.value)
    assert "'img_size'" in msg and "image_size" in msg and "ResNet" in msg
    assert "drop_path_rate" in msg and "in_chans" in msg


@pytest.mark.parametrize(
    ("name", "size_of"),
    [
        ("tiny-vit", lambda m: m.image_encoder.patch_embed.img_size),
        ("tiny-swin", lambda m: m.image_encoder.patch_embed.img_size),
        ("tiny-clip", lambda m: m.image_encoder.image_size),
        ("tiny-hf-clip", lambda m: m._library[0].config.vision_config.image_size),
        ("tiny-dinov2", lambda m: m.image_encoder.config.image_size),
    ],
)
def test_image_size_builds_the_architecture_for_it(name, size_of):
    default = load_model(name)
    model = load_model(name, image_size=64 if default.preprocess.image_size[0] != 64 else 96)
    side = model.preprocess.image_size[0]
    assert side != default.preprocess.image_size[0]
    got = size_of(model)
    assert (got if isinstance(got, int) else next(iter(got))) == side
    assert _forward(model).shape == (2, model.feature_dim)


def test_builder_arguments_reach_the_model():
    model = load_model("tiny-resnet", drop_path_rate=0.2, in_chans=1)
    assert model.preprocess.in_chans == 1
    first = next(m for m in model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    assert model.describe()["options"] == {"drop_path_rate": 0.2, "in_chans": 1}


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("tiny-vit", {"bogus": 1}, "VisionTransformer.*'bogus'.*drop_path_rate"),
        ("tiny-clip", {"vision_cfg": {"bogus": 1}}, "open_clip.*'vision_cfg.bogus'.*vision_cfg"),
        ("tiny-hf-clip", {"bogus": 1}, "transformers clip.*'bogus'.*vision_config"),
        ("tiny-dinov2", {"image_size": "big"}, "image_size must be a positive int"),
        ("tiny-resnet", {"image_size": [28, 0]}, "image_size must be a positive int"),
    ],
)
def test_bad_options_name_the_option_and_what_is_accepted(name, options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_model(name, **options)


def test_run_records_model_options_and_refits_for_them(tmp_path):
    common = dict(
        method="prototype",
        data_options={"patients_per_site": 20},
        out_dir=str(tmp_path),
        evaluation={"n_boot": 0},
    )
    small = run_experiment(RunConfig(model_options={"image_size": 32}, **common))
    assert small["model"]["options"] == {"image_size": 32}
    assert list(small["model"]["preprocess"]["image_size"]) == [32, 32]
    default = run_experiment(RunConfig(**common))
    assert list(default["model"]["preprocess"]["image_size"]) == [64, 64]
    assert "reused" not in default["training"]  # another size is another fit
    with pytest.raises(ConfigError, match="takes no option 'img_size'"):
        run_experiment(RunConfig(model_options={"img_size": 32}, **common))


def test_pretraining_builds_and_records_the_options(tmp_path):
    from clinadapt.ssl import make_config, pretrain

    cfg = make_config(
        model="tiny-vit",
        model_options={"image_size": 48},
        method_options={"proj_dim": 16},
        data_options={"patients_per_site": 8},
        max_steps=2,
        batch_size=8,
        evaluate=False,
        out_dir=str(tmp_path),
    )
    summary = pretrain(cfg)
    assert summary["config"]["model_options"] == {"image_size": 48}
    assert "image_size=48" in summary["load_with"]
    again = load_model("tiny-vit", weights=summary["weights"], image_size=48)
    assert again.preprocess.image_size == (48, 48)
