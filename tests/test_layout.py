"""Channels-last inference of CNNs on the CPU: the same predictions, faster, nothing left behind."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.features import embed
from clinadapt.layout import channels_last_inference, prefers_channels_last
from clinadapt.methods import METHODS, Context
from clinadapt.methods.base import predict_proba
from clinadapt.models import load_model
from clinadapt.models.pooling import ChannelsLastMaxPool2d


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return ImageClassifier(load_model("tiny-resnet"), 3).eval()


@pytest.fixture(scope="module")
def data():
    return make_clinical_shift(seed=0, patients_per_site=5).where(domain="site-b")


def conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_which_models_prefer_channels_last(resnet):
    assert prefers_channels_last(resnet, "cpu")
    assert not prefers_channels_last(resnet, "cuda")  # not measured there: left as it is
    assert not prefers_channels_last(resnet, "cuda:1")
    vit = ImageClassifier(load_model("tiny-vit"), 3)
    assert not prefers_channels_last(vit, "cpu")  # one Conv2d: the patch embedding
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert not prefers_channels_last(no_bn, "cpu")
    volume = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Conv3d(4, 4, 1)
    )
    assert not prefers_channels_last(volume, "cpu")


def test_channels_last_inference_converts_and_restores(resnet, tmp_path):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with channels_last_inference(resnet, "cpu"):
        ws = conv_weights(resnet)
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in ws)
        assert not all(w.is_contiguous() for w in ws)  # 3x3 kernels: the layout did change
    after = resnet.state_dict()
    assert all(v.is_contiguous() for v in after.values())  # safetensors saves it as before
    assert all(torch.equal(before[k], after[k]) for k in before)
    save_file(dict(after), str(tmp_path / "w.safetensors"))
    with channels_last_inference(resnet, "cuda"):  # other devices: untouched
        assert all(w.is_contiguous() for w in conv_weights(resnet))


def test_restored_even_when_inference_fails(resnet):
    with pytest.raises(RuntimeError, match="boom"), channels_last_inference(resnet, "cpu"):
        raise RuntimeError("boom")
    assert all(w.is_contiguous() for w in conv_weights(resnet))


def test_predictions_and_features_match_the_contiguous_computation(resnet, data):
    ctx = Context(batch_size=8, device="cpu")
    got = predict_proba(resnet, data, ctx)
    with torch.no_grad():  # the plain (N, C, H, W) forward, batch by batch
        want = torch.cat(
            [resnet(x).softmax(1) for x, _, _ in data.batches(resnet.preprocess, 8)]
        ).numpy()
        feats = torch.cat(
            [resnet.features(x) for x, _, _ in data.batches(resnet.preprocess, 8)]
        ).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(embed(resnet, data, 8, "cpu"), feats, rtol=1e-5, atol=1e-6)
    assert all(w.is_contiguous() for w in conv_weights(resnet))


def test_bn_matches_train_mode_batchnorm_in_contiguous_layout(resnet, data):
    """bn's private copy runs channels-last; its predictions are those of the published method
    (each layer normalised with its batch mean and unbiased variance, as the authors'
    BayesianBatchNorm does, computed in (N, C, H, W))."""
    method = METHODS.get("bn")()
    ctx = Context(batch_size=16, device="cpu")
    got = method.adapt(resnet, data, method.parse_options({}), ctx).probs
    ref = copy.deepcopy(resnet)

    def batch_stats(bn, inputs):  # per layer: the batch's mean and unbiased variance
        x = inputs[0]
        bn.running_mean = x.mean((0, 2, 3))
        bn.running_var = x.var((0, 2, 3), correction=1)

    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(batch_stats)
    with torch.no_grad():
        out = [ref(x).softmax(1) for x, _, _ in data.batches(resnet.preprocess, 16)]
    np.testing.assert_allclose(np.asarray(got), torch.cat(out).numpy(), atol=1e-5)
    assert all(w.is_contiguous() for w in conv_weights(resnet))  # the source model untouched


def test_max_pool_keeps_the_layout_it_is_given():
    x = torch.randn(2, 4, 9, 9)
    pool = ChannelsLastMaxPool2d(3, 2, 1)
    cl = pool(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert torch.equal(cl, nn.MaxPool2d(3, 2, 1)(x))
    assert pool(x).is_contiguous()
