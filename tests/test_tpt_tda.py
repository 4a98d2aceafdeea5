import math

import numpy as np
import pytest
import torch

from clinadapt.classifier import ImageClassifier
from clinadapt.errors import IncompatibleError
from clinadapt.methods import METHODS, Context
from clinadapt.methods.tta.tda import ClassCache, TDAOptions, tda_logits
from clinadapt.methods.tta.tpt import (
    TPTOptions,
    confident_views,
    make_views,
    marginal_entropy,
    start_prompt,
    tune_and_predict,
    view_transform,
)
from clinadapt.methods.zeroshot import zeroshot_weights
from clinadapt.models import load_model
from clinadapt.shifts import apply_shift
from clinadapt.targets.text_prompt import PromptHead

NAMES = ["normal", "nodule", "consolidation", "effusion"]


@pytest.fixture(scope="module")
def clip():
    return load_model("tiny-clip")


@pytest.fixture(scope="module")
def zs_model(clip):
    model = ImageClassifier(clip, 4, NAMES)
    model.use_cosine_head(zeroshot_weights(clip, NAMES), clip.logit_scale)
    return model


@pytest.fixture(scope="module")
def stream(small_shift):
    ds = apply_shift(small_shift, "domain").tests["site-b"]
    return ds.subset(np.arange(12), name="site-b")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_marginal_entropy_by_hand():
    z = np.random.default_rng(0).normal(size=(6, 4)) * 3
    p = _softmax(z).mean(0)
    assert float(marginal_entropy(torch.tensor(z))) == pytest.approx(-(p * np.log(p)).sum())


def test_confident_views_pick_lowest_entropy():
    z = np.random.default_rng(1).normal(size=(20, 4)) * 2
    p = _softmax(z)
    ent = -(p * np.log(p)).sum(1)
    got = confident_views(torch.tensor(z), 0.1)
    assert sorted(got.tolist()) == sorted(np.argsort(ent)[:2].tolist())
    assert len(confident_views(torch.tensor(z[:3]), 0.1)) == 1  # at least one view


def test_views_keep_layout_and_start_with_the_image():
    torch.manual_seed(0)
    grey = np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    for img in (grey, rgb):
        for augmix in (False, True):
            views = make_views(img, 5, view_transform(img.shape[:2], 0.08, augmix))
            assert len(views) == 6 and views[0] is img
            assert all(v.shape == img.shape and v.dtype == np.uint8 for v in views)
            assert any(not np.array_equal(v, img) for v in views[1:])


def _adamw_first_step(p, g, lr, wd=0.01, eps=1e-8):
    """torch.optim.AdamW's first step written out: decoupled decay, then lr * m/(sqrt(v)+eps)."""
    m_hat, v_hat = g, g * g  # bias-corrected moments after one step
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)


def test_tpt_step_equals_hand_update_and_resets(clip):
    torch.manual_seed(0)
    head = PromptHead(clip, NAMES, init="a photo of a")
    initial = [head.ctx.detach().clone()]
    feats = torch.randn(10, 32)
    opts = TPTOptions(select=0.3, lr=0.01)
    got = tune_and_predict(head, initial, feats, opts)

    # the same step by hand: select 3 views, entropy of their mean, gradient, AdamW
    ref = PromptHead(clip, NAMES, init="a photo of a")
    logits = ref(feats)
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    keep = torch.argsort(ent)[:3]
    p = logits[keep].softmax(-1).mean(0)
    (-(p * p.log()).sum()).backward()
    with torch.no_grad():
        ref.ctx.copy_(_adamw_first_step(ref.ctx, ref.ctx.grad, 0.01))
        expected = ref(feats[:1]).softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # the context moved, and the next image starts again from the initial one
    assert not torch.equal(head.ctx, initial[0])
    torch.testing.assert_close(tune_and_predict(head, initial, feats, opts), got)


def test_tpt_adapt_on_zero_shot_source_leaves_model_unchanged(zs_model, stream):
    before = {k: v.clone() for k, v in zs_model.state_dict().items()}
    tpt = METHODS.get("tpt")()
    res = tpt.adapt(zs_model, stream, tpt.parse_options({"views": 7}), Context(batch_size=8))
    probs = res.probs
    assert probs.shape == (len(stream), 4) and res.info == {"updates_per_image": 1}
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    for k, v in zs_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = tpt.adapt(zs_model, stream, tpt.parse_options({"views": 7}), Context(batch_size=8))
    np.testing.assert_allclose(again.probs, probs, atol=1e-6)  # seeded views


def test_tpt_starts_from_a_learned_prompt(clip):
    model = ImageClassifier(clip, 4, NAMES)
    model.head = PromptHead(clip, NAMES, n_ctx=3)
    head = start_prompt(model, NAMES, "a photo of a")
    assert head is not model.head and head.encoder is clip
    torch.testing.assert_close(head.ctx, model.head.ctx)


def test_tpt_rejects_non_clip_source(stream):
    tpt = METHODS.get("tpt")()
    finetuned = ImageClassifier(load_model("tiny-vit"), 4, NAMES)
    with pytest.raises(IncompatibleError, match=r"source\.method=zeroshot"):
        tpt.adapt(finetuned, stream, tpt.parse_options({}), Context())


def test_class_cache_keeps_lowest_entropy():
    cache = ClassCache(2)
    one = torch.ones(1)
    for ent in (0.5, 0.9, 0.3, 0.7, 0.1):
        cache.add(0, ent, one, one)
    assert [e[0] for e in cache.entries[0]] == [0.1, 0.3]
    cache.add(1, 0.4, one, one)
    assert len(cache) == 3


def _tda_reference(logits, feats, o):
    """TDA written differently: caches rebuilt at each step from everything seen so far."""
    z, f = logits.astype(np.float64), feats / np.linalg.norm(feats, axis=1, keepdims=True)
    p = _softmax(z)
    ent = -(p * np.log(p)).sum(1)
    pred, k = z.argmax(1), z.shape[1]
    h = ent / math.log2(k)  # nats over log2 K, as the authors' get_entropy
    in_band = (h > o.neg_entropy[0]) & (h < o.neg_entropy[1])
    out = np.zeros_like(z)
    for i in range(len(z)):
        final = z[i].copy()
        for sign, cap, alpha, beta, allowed in (
            (1, o.pos_shot_capacity, o.pos_alpha, o.pos_beta, np.ones(len(z), bool)),
            (-1, o.neg_shot_capacity, o.neg_alpha, o.neg_beta, in_band),
        ):
            for c in range(k):
                seen = [j for j in range(i + 1) if pred[j] == c and allowed[j]]
                for j in sorted(seen, key=lambda j: ent[j])[:cap]:
                    if sign > 0:
                        value = np.eye(k)[c]
                    else:
                        value = ((p[j] > o.neg_mask[0]) & (p[j] < o.neg_mask[1])).astype(float)
                    final += sign * alpha * np.exp(-beta * (1 - f[i] @ f[j])) * value
        out[i] = final
    return out


def test_tda_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 4)) * 1.5
    feats = rng.normal(size=(40, 8))
    opts = TDAOptions(neg_entropy=(0.2, 0.9))  # a wider band so the negative cache fills
    got, info = tda_logits(torch.tensor(logits), torch.tensor(feats), opts)
    np.testing.assert_allclose(got.numpy(), _tda_reference(logits, feats, opts), atol=1e-4)
    assert info["negative_joined"] > 0 and info["positive_entries"] <= 4 * 3


def test_tda_without_cache_weight_is_the_source():
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(10, 3)))
    opts = TDAOptions(pos_alpha=0.0, neg_alpha=0.0)
    got, _ = tda_logits(logits, torch.tensor(rng.normal(size=(10, 5))), opts)
    torch.testing.assert_close(got, logits.float())
    with pytest.raises(ValueError, match="neg_mask"):
        TDAOptions(neg_mask=(0.5, 0.2))


def test_tda_adapt_on_zero_shot_source(zs_model, stream):
    tda = METHODS.get("tda")()
    ctx = Context(batch_size=5)
    res = tda.adapt(zs_model, stream, tda.parse_options({}), ctx)
    probs = res.probs
    assert probs.shape == (len(stream), 4)
    # the first image only meets itself in the cache: source logits + alpha * 1 on its class
    with torch.no_grad():
        x, _, _ = next(stream.batches(zs_model.preprocess, 1))
        z = zs_model(x)[0]
        z[z.argmax()] += 2.0
    np.testing.assert_allclose(probs[0], z.softmax(-1).numpy(), atol=1e-5)
    assert res.info["positive_entries"] >= 1
