"""3D backbones: tiny configurations of every architecture, checked against their reference
implementations, published checkpoint layouts, offline weight rules, options, 2D on volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.errors import ConfigError, IncompatibleError, WeightsUnavailableError
from clinadapt.models import MODELS, load_model
from clinadapt.models.spec import ModelSpec
from clinadapt.models.volume.base import VolumeModel, check_spatial_dims
from clinadapt.models.volume.build import make_arch
from clinadapt.models.volume.primus import rope_3d
from clinadapt.models.volume.slices import slice_positions

REFERENCES = Path(__file__).parent / "data" / "volume_models"
TINY = ["tiny-resenc", "tiny-stunet", "tiny-primus", "tiny-swinunetr"]
# the tiny configurations the reference files were computed with (see their metadata)
REFERENCE_CONFIGS = {
    "resenc": {
        "features": [4, 8, 8],
        "blocks": [1, 2, 2],
        "strides": [1, 2, 2],
        "n_conv_decoder": 1,
        "norm": "instance",
        "volume_size": 16,
    },
    "stunet": {"dims": [4, 8, 8, 16], "depth": [1, 2, 1, 1], "volume_size": 16},
    "primus": {"embed_dim": 48, "depth": 2, "num_heads": 2, "patch": 8, "volume_size": 16},
}


def volumes(n=2, shape=(32, 32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(shape).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_backbone_encodes_volumes_and_segments_them(name):
    opts = {"volume_size": 32} if name == "tiny-swinunetr" else {}
    m = load_model(name, **opts)
    assert (
        isinstance(m, VolumeModel)
        and m.spatial_dims == 3
        and MODELS.entry(name).tags[0] == "volume"
    )
    x = m.preprocess(volumes(2, (30, 34, 28)))  # any shape: resized to the model's grid
    assert tuple(x.shape) == (2, 1, 32, 32, 32)
    f = m.encode_image(x)
    assert tuple(f.shape) == (2, m.feature_dim) and torch.isfinite(f).all()
    dec, info = m.make_decoder(3)
    if name == "tiny-swinunetr":  # its decoder needs 64^3 (a normalised 1-voxel bottleneck)
        with pytest.raises(IncompatibleError, match="at least 64"):
            dec(m.features(x), x)
        m, x = load_model(name), load_model(name).preprocess(volumes(1, (64, 64, 64)))
        dec, info = m.make_decoder(3)
    with torch.no_grad():
        logits = dec(m.features(x), x)
    size = tuple(x.shape[2:])
    assert tuple(logits.shape) == (len(x), 3, *size) and info["decoder"] == "random init"
    again = load_model(name, **opts)  # seeded initialisation: the same random weights
    x = again.preprocess(volumes(2, (30, 34, 28)))
    torch.testing.assert_close(again.encode_image(x), f)
    d = m.describe()
    assert d["spatial_dims"] == 3 and d["arch"]["arch"] == MODELS.get(name).arch
    with pytest.raises(IncompatibleError, match="takes \\(N,C,X,Y,Z\\) volumes"):
        m.encode_image(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("arch", sorted(REFERENCE_CONFIGS))
def test_network_equals_the_authors_implementation(arch):
    """The reference file holds a tiny network's state dict in the authors' layout, an input and
    the output their code computed (dynamic-network-architectures 0.4.3's ResidualEncoderUNet and
    Primus with timm 1.0.22; STU-Net's own STUNet class)."""
    ref = load_file(str(REFERENCES / f"{arch}_reference.safetensors"))
    state = {k[len("state.") :]: v for k, v in ref.items() if k.startswith("state.")}
    spec = ModelSpec(f"ref-{arch}", "volume", arch, None, "", kwargs=REFERENCE_CONFIGS[arch])
    net, pp = make_arch(spec, {})
    model = VolumeModel(spec.name, net, pp)
    path = REFERENCES / f"{arch}_reference.safetensors"
    mapped = net.map_checkpoint(state)
    model.image_encoder.load_state_dict(mapped.encoder, strict=True)
    model.pretrained_decoder = mapped.decoder
    dec, info = model.make_decoder(ref["output"].shape[1])
    assert info["decoder_tensors_loaded"] == info["decoder_tensors"], path
    model.eval()
    with torch.no_grad():
        out = dec(model.features(ref["input"]), ref["input"])
    # float32 3D convolutions summed in another order (thread count, CPU kernel) move single
    # outputs by about 1e-5; a wrong layer or weight mapping moves them by orders more
    torch.testing.assert_close(out, ref["output"], atol=5e-5, rtol=1e-4)


def test_rotary_embedding_of_primus_is_timms_1_0_22_formula():
    """sin/cos of position x frequency, frequencies 1/10000^(k/n), n = rope_dim/4 per axis,
    each angle twice (interleaved), sin half first: written out for one token."""
    emb = rope_3d((2, 3, 4), rope_dim=8)
    assert tuple(emb.shape) == (24, 2 * 12)
    bands = 1.0 / 10000 ** (np.arange(2) / 2)
    token = (1, 2, 3)  # grid position of row 1*12 + 2*4 + 3 = 23
    angles = np.repeat(np.concatenate([p * bands for p in token]), 2)
    np.testing.assert_allclose(
        emb[23].numpy(), np.concatenate([np.sin(angles), np.cos(angles)]), atol=1e-6
    )


def test_swinunetr_decoder_reproduces_monais_network():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    full = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)
    )
    model = load_model("tiny-swinunetr", volume_size=64)
    mapped = model.arch.map_checkpoint(full.state_dict())  # MONAI's own layout: swinViT.*
    model.image_encoder.load_state_dict(mapped.encoder, strict=True)
    model.pretrained_decoder = mapped.decoder
    dec, info = model.make_decoder(2)
    assert info["decoder_tensors_loaded"] == info["decoder_tensors"]
    x = torch.randn(1, 1, 64, 64, 64)
    full.eval(), model.eval(), dec.eval()
    with torch.no_grad():
        torch.testing.assert_close(dec(model.features(x), x), full(x), atol=1e-5, rtol=1e-5)


def test_swinunetr_reads_tang_et_al_self_supervised_layout_like_monai():
    """model_swinvit.pt: ``state_dict`` of ``module.*`` keys; MONAI's load_from is the reference."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(1)
    donor = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)
    )
    ssl = {
        "module."
        + k[len("swinViT.") :]
        .replace(".mlp.linear1.", ".mlp.fc1.")
        .replace(".mlp.linear2.", ".mlp.fc2."): v
        for k, v in donor.state_dict().items()
        if k.startswith("swinViT.")
    }
    torch.manual_seed(2)
    reference = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)
    )
    reference.load_from({"state_dict": ssl})
    model = load_model("tiny-swinunetr", volume_size=64)
    mapped = model.arch.map_checkpoint(ssl)
    model.image_encoder.load_state_dict(mapped.encoder, strict=True)
    x = torch.randn(1, 1, 64, 64, 64)
    reference.eval(), model.eval()
    with torch.no_grad():
        want = reference.swinViT(x, True)
        got = model.features(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_checkpoints_load_from_local_files_under_the_offline_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CLINADAPT_OFFLINE", "1")
    # a published model without its file: one error naming the file and the folder
    with pytest.raises(WeightsUnavailableError) as err:
        load_model("resenc-l", features=[4, 4, 4, 4, 4, 4], blocks=[1] * 6)
    msg = str(err.value)
    assert "checkpoint_final.pth" in msg and str(tmp_path / "models" / "resenc-l") in msg
    # the same model (shrunk by options) finds an nnU-Net checkpoint in its folder
    small = {"features": [4, 4, 4, 4, 4, 4], "blocks": [1] * 6, "volume_size": 64}
    donor = load_model("resenc-l", pretrained=False, **small)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(0.1)
    dec, _ = donor.make_decoder(2)
    state = {f"encoder.{k}": v for k, v in donor.image_encoder.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in dec.state_dict().items() if not k.startswith("head.")}
    folder = tmp_path / "models" / "resenc-l"
    folder.mkdir(parents=True)
    torch.save(
        {"network_weights": state, "trainer_name": "nnUNetTrainer"}, folder / "checkpoint_final.pth"
    )
    m = load_model("resenc-l", **small)
    x = m.preprocess(volumes(1))
    torch.testing.assert_close(m.encode_image(x), donor.encode_image(x))
    assert "model dir" in m.source and m.describe()["checkpoint"]["decoder_tensors"] > 0
    # an explicit file of another architecture: one line naming it
    other = tmp_path / "other.safetensors"
    save_file({"conv_blocks_context.0.0.conv1.weight": torch.zeros(4, 1, 3, 3, 3)}, str(other))
    with pytest.raises(IncompatibleError, match=r"other\.safetensors: does not fit 'tiny-resenc'"):
        load_model("tiny-resenc", weights=other)
    # a pickle that holds more than tensors is refused (torch.load weights_only=True)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cfg": Path("/")}, evil)
    with pytest.raises(IncompatibleError, match=r"evil\.pth"):
        load_model("tiny-resenc", weights=evil)


def test_stunet_reads_the_authors_v1_checkpoint_container(tmp_path):
    small = {"dims": [4, 8, 8, 8, 8, 8], "volume_size": 64}
    donor = load_model("stunet-b", pretrained=False, **small)
    dec, _ = donor.make_decoder(3)
    state = {
        k.replace("stages.", "conv_blocks_context.", 1): v
        for k, v in donor.image_encoder.state_dict().items()
    }
    state |= {
        k.replace("stages.", "conv_blocks_localization.", 1): v
        for k, v in dec.state_dict().items()
        if k.startswith("stages.")
    }
    state |= {k: v for k, v in dec.state_dict().items() if k.startswith("upsample_layers.")}
    state |= {"seg_outputs.4.weight": dec.head.weight, "seg_outputs.4.bias": dec.head.bias}
    torch.save({"state_dict": state, "epoch": 4000}, tmp_path / "base_ep4k.model")
    m = load_model("stunet-b", weights=tmp_path / "base_ep4k.model", **small)
    x = m.preprocess(volumes(1))
    dec2, info = m.make_decoder(3)
    assert info["decoder_tensors_loaded"] == info["decoder_tensors"]
    m.eval(), donor.eval(), dec.eval(), dec2.eval()
    with torch.no_grad():
        torch.testing.assert_close(dec2(m.features(x), x), dec(donor.features(x), x))


def test_published_sizes_follow_the_papers():
    counts = {}
    for name in ("stunet-s", "stunet-b", "primus-s", "resenc-l"):
        spec = MODELS.get(name)
        with torch.device("meta"):
            arch, _ = make_arch(spec, {})
        counts[name] = sum(p.numel() for p in arch.encoder.parameters())
    # STU-Net's paper: S 14.6M and B 58.3M parameters for the whole network (encoder ~ 60%)
    assert 5e6 < counts["stunet-s"] < 14.6e6 and 25e6 < counts["stunet-b"] < 58.3e6
    assert counts["stunet-b"] / counts["stunet-s"] == pytest.approx(4.0, rel=0.02)  # widths x2
    assert (
        MODELS.get("primus-m").kwargs["embed_dim"] == 864
        and MODELS.get("primus-l").kwargs["depth"] == 24
    )
    assert MODELS.get("resenc-l").kwargs["blocks"] == [1, 3, 4, 6, 6, 6]


def test_volume_options_are_checked():
    with pytest.raises(
        ConfigError,
        match=r"takes no option 'image_size' \(a 3D backbone's input side is volume_size\)",
    ):
        load_model("tiny-resenc", image_size=32)
    with pytest.raises(ConfigError, match=r"volume_size .* must be a multiple of 8"):
        load_model("tiny-resenc", volume_size=20)
    m = load_model("tiny-resenc", volume_size=[16, 16, 24], norm="instance")
    assert m.preprocess.volume_size == (16, 16, 24) and m.options == {
        "volume_size": [16, 16, 24],
        "norm": "instance",
    }
    assert any(isinstance(x, nn.InstanceNorm3d) for x in m.modules())


def test_preprocessing_resizes_and_zscores_each_volume():
    m = load_model("tiny-resenc")
    v = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32) * 0.5 + 0.2
    x = m.preprocess([v])[0, 0].numpy()
    np.testing.assert_allclose(x, (v - v.mean()) / v.std(ddof=1), atol=1e-4)
    unit = load_model("tiny-swinunetr", volume_size=32)
    np.testing.assert_allclose(unit.preprocess([v])[0, 0].numpy(), v, atol=1e-6)


def test_a_2d_backbone_on_volumes_pools_its_slice_features():
    m = load_model("slices:tiny-resnet", slices=4)
    inner = m.inner
    v = volumes(1, (24, 20, 8))[0]
    x = m.preprocess([v])
    assert tuple(x.shape) == (1, 4, 3, 64, 64)
    ks = slice_positions(8, 4)
    assert ks.tolist() == [1, 3, 5, 7]
    want = torch.stack(
        [inner.encode_image(inner.preprocess([np.rot90(v[:, :, k]).copy()])) for k in ks]
    ).mean(0)
    torch.testing.assert_close(m.encode_image(x), want)
    mx = load_model("slices:tiny-resnet", slices=4, slice_pooling="max")
    assert (mx.encode_image(x) >= m.encode_image(x) - 1e-6).all()
    assert slice_positions(3, 5).tolist() == [0, 0, 1, 1, 2]
    # one set of parameters: the state dict names each once (safetensors-safe)
    assert all(k.startswith("image_encoder.") for k in m.state_dict())
    with pytest.raises(ConfigError, match="slice_pooling"):
        load_model("slices:tiny-resnet", slice_pooling="median")
    with pytest.raises(ConfigError, match="already a 3D backbone"):
        load_model("slices:tiny-resenc")


def test_dimensionality_mismatch_is_explained():
    with pytest.raises(
        IncompatibleError,
        match=r"'tiny-resnet' is a 2D backbone, but 'vols' holds volumes.*slices:tiny-resnet",
    ):
        check_spatial_dims(load_model("tiny-resnet"), 3, "vols")
    with pytest.raises(IncompatibleError, match="is a 3D backbone, but 'imgs' holds 2D images"):
        check_spatial_dims(load_model("tiny-resenc"), 2, "imgs")


@pytest.mark.parametrize("name", ["tiny-resenc", "tiny-stunet", "tiny-primus", "tiny-swinunetr"])
def test_targets_open_the_parameters_they_name_on_3d_backbones(name):
    from clinadapt.targets import apply_target
    from clinadapt.targets.basic import norm_layers

    opts = {"volume_size": 32} if name == "tiny-swinunetr" else {}
    enc = load_model(name, **opts)
    clf = ImageClassifier(enc, 2)
    head = sum(p.numel() for p in clf.head.parameters())
    assert apply_target(clf, "head").trainable == head
    norms = sum(
        p.numel() for m in norm_layers(enc.image_encoder) for p in m.parameters(recurse=False)
    )
    assert apply_target(clf, "norm").trainable == norms > 0
    biases = sum(p.numel() for n, p in enc.image_encoder.named_parameters() if n.endswith(".bias"))
    assert apply_target(clf, "bias").trainable == biases
    assert apply_target(clf, "full").trainable == sum(p.numel() for p in clf.parameters())
    last = apply_target(clf, "last-k+head", {"last-k": {"k": 1}})
    assert head < last.trainable < sum(p.numel() for p in clf.parameters())
    fresh = ImageClassifier(load_model(name, **opts), 2)
    lora = apply_target(fresh, "lora+head", {"lora": {"rank": 2}})
    names = [n for n, p in fresh.named_parameters() if p.requires_grad and "lora_" in n]
    assert names and lora.trainable == head + sum(
        p.numel() for n, p in fresh.named_parameters() if "lora_" in n
    )
    x = enc.preprocess(volumes(1))
    assert torch.isfinite(fresh(x)).all()  # LoRA starts at zero: the base model's output


@pytest.mark.parametrize("name", ["tiny-primus", "tiny-swinunetr"])
def test_adapters_fit_the_3d_transformers_and_cnns_are_told_why_not(name):
    from clinadapt.targets import apply_target

    opts = {"volume_size": 32} if name == "tiny-swinunetr" else {}
    clf = ImageClassifier(load_model(name, **opts), 2)
    head = sum(p.numel() for p in clf.head.parameters())
    info = apply_target(clf, "adapter+head")
    opened = [n for n, p in clf.named_parameters() if p.requires_grad and not n.startswith("head")]
    assert opened and info.trainable == head + sum(
        p.numel() for n, p in clf.named_parameters() if n in opened
    )
    x = clf.encoder.preprocess(volumes(1))
    assert torch.isfinite(clf(x)).all()
    with pytest.raises(IncompatibleError, match="no transformer blocks"):
        apply_target(ImageClassifier(load_model("tiny-resenc"), 2), "adapter+head")
