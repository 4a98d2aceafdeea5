import pytest
import torch

from clinadapt.classifier import ImageClassifier
from clinadapt.errors import IncompatibleError
from clinadapt.models import load_model
from clinadapt.targets import apply_target


def _grads(model):
    x = torch.randn(2, 3, *model.preprocess.image_size)
    model.train()
    model(x).sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_norm_on_vit_counts_layernorm_affine_by_hand():
    model = ImageClassifier(load_model("tiny-vit"), 4)
    info = apply_target(model, "norm")
    # tiny-vit: dim 64, depth 2 -> 2 LayerNorms per block + the final norm, each 2*64 params
    assert info.trainable == (2 * 2 + 1) * 2 * 64
    grads = _grads(model)
    assert grads and all("norm" in n for n in grads)


def test_norm_on_resnet_opens_batchnorm_affine():
    model = ImageClassifier(load_model("tiny-resnet"), 4)
    info = apply_target(model, "norm")
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 3 + 2 * 4 + 3  # deep stem, two per block, three projections
    assert info.trainable == sum(2 * m.num_features for m in bn)
    bn_params = {
        f"{mn}.{pn}" for mn, m in model.named_modules() if m in bn for pn, _ in m.named_parameters()
    }
    assert _grads(model) == bn_params


def test_bias_target_and_errors():
    model = ImageClassifier(load_model("tiny-vit"), 4)
    info = apply_target(model, "bias")
    n_bias = sum(p.numel() for n, p in model.encoder.named_parameters() if n.endswith(".bias"))
    assert info.trainable == n_bias
    assert all(n.endswith("bias") for n in _grads(model))
    with pytest.raises(IncompatibleError, match="'Sequential' has no normalisation layer"):
        apply_target(torch.nn.Sequential(torch.nn.Linear(3, 3)), "norm")
    info = apply_target(model, "norm+head")
    assert info.trainable == (2 * 2 + 1) * 2 * 64 + 64 * 4 + 4
