"""SimCLR, DINO and MAE on tiny models: they train, their state updates follow the papers."""

import math

import pytest
import torch

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.models import load_model
from clinadapt.ssl import SSL_METHODS
from clinadapt.ssl.augment import Augmenter, policy_for_modality
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.encode import accepts_size, encode, vit_tokens

TINY = {
    "simclr": {"proj_dim": 16},
    "dino": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2},
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
}


def make(method, model="tiny-vit", **options):
    fm = load_model(model)
    cls = SSL_METHODS.get(method)
    aug = Augmenter(policy_for_modality("xray"), fm.preprocess.mean, fm.preprocess.std)
    return cls(fm, cls.parse_options({**TINY[method], **options}), aug)


@pytest.fixture(scope="module")
def images(small_shift):
    x = torch.stack([torch.as_tensor(small_shift.image(i)) for i in range(16)]).float() / 255
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize("method", ["simclr", "dino", "mae"])
def test_loss_decreases_on_a_fixed_batch(method, images):
    torch.manual_seed(0)
    # DINO's targets move with the teacher and the centre by design; hold both still here so
    # that the student's loss must fall (their updates are checked in the tests below)
    hold = {"momentum_teacher": 1.0, "center_momentum": 0.999} if method == "dino" else {}
    m = make(method, **hold)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        # the same views every step: the loss must fall if gradients reach backbone and heads
        loss = m.training_loss(images, ImageDraws.seeded(0, len(images)), step, 100)
        opt.zero_grad()
        loss.backward()
        m.before_optimizer_step(step, 100)
        opt.step()
        m.after_step(step, 100)
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < losses[0]
    grads = [p.grad for p in m.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_registry_and_options_errors():
    assert {"simclr", "dino", "mae"} <= set(SSL_METHODS.names())
    with pytest.raises(ConfigError, match="simclr"):
        SSL_METHODS.get("simclr").parse_options({"temprature": 0.1})
    with pytest.raises(ConfigError, match="mask_ratio"):
        SSL_METHODS.get("mae").parse_options({"mask_ratio": 1.5})


def test_mae_needs_a_timm_vit():
    with pytest.raises(IncompatibleError, match="tiny-resnet"):
        make("mae", "tiny-resnet")


@pytest.mark.parametrize("model", ["tiny-resnet", "tiny-dinov2"])
def test_simclr_and_dino_take_other_backbones(model, images):
    for method in ("simclr", "dino"):
        m = make(method, model)
        loss = m.training_loss(images[:4], ImageDraws.seeded(0, 4), 0, 10)
        loss.backward()
        assert torch.isfinite(loss)


def test_dino_teacher_ema_and_centre():
    m = make("dino", momentum_teacher=0.9, center_momentum=0.9)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    s = [p.detach().clone() for p in m.backbone.parameters()]
    t = [p.detach().clone() for p in m.teacher.parameters()]
    m.after_step(0, 10)  # momentum at step 0 is exactly momentum_teacher
    for ps, pt0, pt in zip(s, t, m.teacher.parameters(), strict=True):
        assert torch.allclose(pt, 0.9 * pt0 + 0.1 * ps, atol=1e-6)
    assert all(not p.requires_grad for p in m.teacher.parameters())
    # the centre moves toward the teacher outputs' batch mean by (1 - 0.9)
    out = torch.randn(6, 32)
    c0 = m.center.clone()
    m._update_center(out)
    assert torch.allclose(m.center, 0.9 * c0 + 0.1 * out.mean(0, keepdim=True), atol=1e-6)
    assert m.export_backbone() is m.teacher


def test_dino_last_layer_frozen_early_and_weight_norm():
    m = make("dino", freeze_last_layer_steps=5)
    x = torch.randn(3, 64)
    out = m.head(x)
    # with the gain fixed to 1 every prototype has unit norm: logits are cosines of the bottleneck
    w = m.head.last_layer.g * torch.nn.functional.normalize(m.head.last_layer.v, dim=1)
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-6)
    assert not m.head.last_layer.g.requires_grad
    out.sum().backward()
    m.before_optimizer_step(2, 10)
    assert m.head.last_layer.v.grad is None
    assert m.head.mlp[0].weight.grad is not None


def test_dino_local_crops_size():
    m = make("dino")
    assert m.local_size == 16  # 32 * 96/224 rounded to the patch size 8
    clip = make("dino", "tiny-clip")
    assert clip.local_size == 32  # a fixed-size model gets local crops at its own size


def test_vit_tokens_equals_the_timm_forward():
    fm = load_model("tiny-vit")
    vit = fm.image_encoder
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), vit_tokens(vit, x), atol=1e-5)
        assert torch.allclose(encode(fm, x), fm.encode_image(x), atol=1e-5)
        keep = torch.tensor([[0, 5], [3, 15]])
        assert vit_tokens(vit, x, keep).shape == (2, 1 + 2, 64)
        assert encode(fm, torch.randn(2, 3, 16, 16)).shape == (2, 64)
    assert accepts_size(fm, 16) and not accepts_size(fm, 12)
    assert accepts_size(load_model("tiny-resnet"), 24)
    assert not accepts_size(load_model("tiny-clip"), 16)


def test_mae_reconstructs_from_visible_patches_only():
    torch.manual_seed(0)
    m = make("mae")
    vit = m.backbone.image_encoder
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    restore = torch.arange(16).repeat(2, 1)
    with torch.no_grad():
        pred = m.decode(vit_tokens(vit, x, keep), restore, vit.num_prefix_tokens)
        # pixels of a masked patch (index 12) must not influence the prediction
        x2 = x.clone()
        x2[:, :, 24:32, 0:8] += 5.0
        pred2 = m.decode(vit_tokens(vit, x2, keep), restore, vit.num_prefix_tokens)
    assert pred.shape == (2, 16, 8 * 8 * 3)
    assert torch.allclose(pred, pred2)


def test_dino_flags_collapse(images):
    m = make("dino")
    m.training_loss(images[:8], ImageDraws.seeded(0, 8), 0, 10)
    d = m.diagnostics()
    assert (
        0 <= d["teacher_target_entropy"] <= d["entropy_of_uniform"] == pytest.approx(math.log(32))
    )
    assert 0 < d["top_prototype_share"] <= 1
    m.last_target_entropy, m.last_top_share = 0.999 * math.log(32), 0.2  # uniform targets
    assert m.diagnostics()["collapsed"]
    m.last_target_entropy, m.last_top_share = 0.5 * math.log(32), 1.0  # one prototype for all
    assert m.diagnostics()["collapsed"]
    m.last_target_entropy, m.last_top_share = 0.5 * math.log(32), 0.3
    assert not m.diagnostics()["collapsed"]
    assert not make("simclr").diagnostics()["collapsed"]
