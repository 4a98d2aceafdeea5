"""Each test-time method's update, pinned against an independent computation on a tiny model."""

import copy
import math

import numpy as np
import pytest
import torch

from clinadapt.classifier import ImageClassifier
from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.methods import METHODS, Context
from clinadapt.methods.tta.augment import augment_views, augmix
from clinadapt.methods.tta.eata import eata_masks
from clinadapt.methods.tta.memo import marginal_entropy
from clinadapt.methods.tta.t3a import prototypes, select_supports
from clinadapt.methods.tta.tttpp import alignment_loss, attach_branch, rotate_batch
from clinadapt.methods.tta.vnl import neighbour_labels
from clinadapt.models import load_model
from clinadapt.targets import apply_target

K = 4


def tiny(target="norm", seed=0):
    torch.manual_seed(seed)
    model = ImageClassifier(load_model("tiny-resnet"), K)
    apply_target(model, target)
    return model


def batch(n=8, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build(name, model, batch_size=8, **options):
    method = METHODS.get(name)()
    opts = method.parse_options(options)
    return method, method.build(copy.deepcopy(model), K, opts, Context(batch_size=batch_size))


def entropy_ref(logits):
    """Mean prediction entropy, written differently from the library (torch.distributions)."""
    return torch.distributions.Categorical(logits=logits).entropy()


def assert_params(adapter, expected, atol=1e-6):
    got = trainable(adapter.model)
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n].detach(), expected[n], atol=atol, rtol=1e-5)


def hand_sgd(model, loss_fn, lr):
    """One plain gradient step on ``loss_fn(reference model)``; BN in train mode uses the batch."""
    ref = copy.deepcopy(model).train()
    params = trainable(ref)
    loss = loss_fn(ref)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads, strict=True)}, loss


# --- tent -------------------------------------------------------------------------------------
def test_tent_step_is_an_entropy_gradient_step_on_norm_parameters():
    model, x = tiny(), batch()
    expected, ref_loss = hand_sgd(model, lambda m: entropy_ref(m(x)).mean(), lr=0.5)
    _, adapter = build("tent", model, optimizer="sgd", lr=0.5, momentum=0.0)
    logits, loss = adapter.forward_and_adapt(x)
    assert_params(adapter, expected)
    assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    # the prediction comes from the same forward pass as the loss (before the update)
    torch.testing.assert_close(logits, copy.deepcopy(model).train()(x), atol=1e-5, rtol=1e-5)
    # only norm affine parameters are trainable, and every one of them moved
    names = set(trainable(adapter.model))
    norm = {
        f"{mn}.{pn}"
        for mn, m in model.named_modules()  # the adapter's copy, before tent configured it
        if isinstance(m, torch.nn.BatchNorm2d)
        for pn, _ in m.named_parameters()
    }
    assert names == norm


def test_tent_default_is_adam_1e3_and_its_first_step_is_lr_times_sign():
    model, x = tiny(), batch()
    method = METHODS.get("tent")()
    opts = method.parse_options({})
    assert (opts.optimizer, opts.lr, opts.steps) == ("adam", 1e-3, 1)
    ref = copy.deepcopy(model).train()
    params = trainable(ref)
    grads = torch.autograd.grad(entropy_ref(ref(x)).mean(), list(params.values()))
    adapter = method.build(copy.deepcopy(model), K, opts, Context(batch_size=8))
    adapter.forward_and_adapt(x)
    got = trainable(adapter.model)
    assert set(got) == set(params)
    for (n, p), g in zip(params.items(), grads, strict=True):
        step = (got[n] - p).detach()
        # Adam's bias-corrected first step: lr * g / (|g| + eps); where |g| is near eps the
        # step depends on float noise in g, so there only its bound is checked
        clear = g.abs() > 1e-6
        torch.testing.assert_close(
            step[clear], (-1e-3 * g / (g.abs() + 1e-8))[clear], atol=1e-6, rtol=1e-5
        )
        assert (step.abs() <= 1e-3 + 1e-7).all()


def test_tent_acts_on_any_target_and_refuses_an_empty_one():
    model, x = tiny("bias"), batch()
    expected, _ = hand_sgd(model, lambda m: entropy_ref(m(x)).mean(), lr=0.1)
    _, adapter = build("tent", model, optimizer="sgd", lr=0.1, momentum=0.0)
    adapter.forward_and_adapt(x)
    assert_params(adapter, expected)
    frozen = tiny()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(IncompatibleError, match="target opened no parameter"):
        build("tent", frozen)


def test_layernorm_model_tent_step():
    torch.manual_seed(0)
    model = ImageClassifier(load_model("tiny-vit"), K)
    apply_target(model, "norm")
    x = torch.randn(6, 3, 32, 32)
    expected, _ = hand_sgd(model, lambda m: entropy_ref(m(x)).mean(), lr=0.3)
    _, adapter = build("tent", model, optimizer="sgd", lr=0.3, momentum=0.0)
    adapter.forward_and_adapt(x)
    assert_params(adapter, expected, atol=1e-5)


def test_single_sample_bn_blends_source_statistics():
    model = tiny()
    _, adapter = build("tent", model, batch_size=1)
    norms = [m for m in adapter.model.modules() if type(m).__name__ == "BatchStatsNorm"]
    assert norms and all(m.prior == pytest.approx(16 / 17) for m in norms)
    _, adapter = build("tent", model, batch_size=8)
    norms = [m for m in adapter.model.modules() if type(m).__name__ == "BatchStatsNorm"]
    assert all(m.prior == 0 for m in norms)


# --- eata -------------------------------------------------------------------------------------
def test_eata_filters_by_hand():
    logits = torch.tensor(
        [[6.0, 0, 0, 0], [0, 0, 0, 0], [0, 5.0, 0, 0], [0.5, 0.4, 0.3, 0.2], [0, 0, 7.0, 1.0]]
    )
    p = torch.softmax(logits, 1).numpy()
    ent = -(p * np.log(p)).sum(1)
    e0 = 0.4 * math.log(4)
    average = torch.tensor([0.7, 0.1, 0.1, 0.1])
    a = average.numpy()
    cos = (p @ a) / (np.linalg.norm(p, axis=1) * np.linalg.norm(a))
    reliable, selected = eata_masks(logits, e0, average, 0.5)
    np.testing.assert_array_equal(reliable.numpy(), ent < e0)
    np.testing.assert_array_equal(selected.numpy(), (ent < e0) & (np.abs(cos) < 0.5))
    assert reliable.tolist() == [True, False, True, False, True]
    assert selected.tolist() == [False, False, True, False, True]
    _, first = eata_masks(logits, e0, None, 0.5)  # no average yet: every reliable one
    assert first.tolist() == reliable.tolist()


def test_eata_fisher_and_update_by_hand():
    model = tiny()
    ds = make_clinical_shift(seed=0, patients_per_site=5).subset(range(10))
    ctx = Context(batch_size=5)
    method = METHODS.get("eata")()
    opts = method.parse_options(
        {"lr": 0.2, "momentum": 0.0, "e_margin": 1.0, "fisher_alpha": 50.0, "fisher_size": 10}
    )
    method.prepare(model, ds, opts, ctx)
    # Fisher by hand: mean over the two batches of the squared gradient of the NLL of argmax
    ref = copy.deepcopy(model).train()
    params = trainable(ref)
    sq = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in (0, 5):
        imgs = [ds.image(i) for i in range(start, start + 5)]
        logits = ref(model.preprocess(imgs))
        nll = -logits.log_softmax(1).gather(1, logits.argmax(1, keepdim=True)).mean()
        for (n, _), g in zip(
            params.items(), torch.autograd.grad(nll, list(params.values())), strict=True
        ):
            sq[n] += g**2
    for n in params:
        torch.testing.assert_close(method.fisher[n][0], sq[n] / 2, atol=1e-7, rtol=1e-4)
    adapter = method.build(copy.deepcopy(model), K, opts, ctx)
    # the penalty is alpha * sum F (theta - theta0)^2
    with torch.no_grad():
        for p in trainable(adapter.model).values():
            p.add_(0.01)
    hand = sum(50.0 * (method.fisher[n][0] * 0.01**2).sum() for n in params)
    torch.testing.assert_close(adapter.fisher_penalty(), hand, rtol=1e-4, atol=1e-9)
    adapter.reset()
    # one step: weighted entropy of the selected samples (all reliable, no average yet)
    x = batch(6)
    e0 = math.log(4)

    def loss_fn(m):
        ent = entropy_ref(m(x))
        keep = ent.detach() < e0
        return (ent[keep] * torch.exp(-(ent[keep].detach() - e0))).mean()

    expected, _ = hand_sgd(model, loss_fn, lr=0.2)
    adapter.forward_and_adapt(x)
    assert_params(adapter, expected, atol=1e-6)
    assert adapter.average is not None
    with pytest.raises(ConfigError, match="Fisher"):
        METHODS.get("eata")().prepare(model, None, opts, ctx)


# --- sar --------------------------------------------------------------------------------------
def test_sar_is_a_two_step_sam_update_on_reliable_samples():
    model, x = tiny(), batch()
    rho, lr = 0.05, 0.5
    ref = copy.deepcopy(model).train()
    params = trainable(ref)
    ent = entropy_ref(ref(x))
    keep = ent.detach() < math.log(4)
    g1 = torch.autograd.grad(ent[keep].mean(), list(params.values()))
    norm = torch.sqrt(sum((g**2).sum() for g in g1))
    origin = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for (_, p), g in zip(params.items(), g1, strict=True):
            p.add_(rho * g / norm)
    ent2 = entropy_ref(ref(x))[keep]
    g2 = torch.autograd.grad(ent2[ent2.detach() < math.log(4)].mean(), list(params.values()))
    expected = {n: origin[n] - lr * g for n, g in zip(params, g2, strict=True)}
    _, adapter = build("sar", model, lr=lr, momentum=0.0, e_margin=1.0)
    adapter.forward_and_adapt(x)
    assert_params(adapter, expected, atol=1e-6)
    assert adapter.ema == pytest.approx(float(ent2.mean().detach()), rel=1e-5)


def test_sar_recovery_resets_and_is_counted():
    model = tiny()
    stream = make_clinical_shift(seed=0, patients_per_site=5).subset(range(24))
    method = METHODS.get("sar")()
    # a reset constant above any entropy: every update triggers the recovery
    opts = method.parse_options({"e_margin": 1.0, "reset_constant": 100.0, "guard": False})
    ctx = Context(batch_size=8)
    probs = method.adapt(model, stream, opts, ctx)
    assert probs.shape == (24, K)
    events = ctx.history["tta_resets"]
    assert len(events) == 3 and all("sar recovery" in e["reason"] for e in events)
    assert [e["position"] for e in events] == [0, 8, 16]


# --- t3a --------------------------------------------------------------------------------------
def test_t3a_prototypes_by_hand():
    model, x = tiny("head"), batch(6)
    method = METHODS.get("t3a")()
    adapter = method.build(
        copy.deepcopy(model).eval(), K, method.parse_options({"filter_k": 2}), Context()
    )
    logits, _ = adapter.forward_and_adapt(x)
    with torch.no_grad():
        model.eval()
        z = model.features(x).numpy().astype(np.float64)
        w = model.head.weight.numpy().astype(np.float64)
        b = model.head.bias.numpy().astype(np.float64)

    def soft(v):
        e = np.exp(v - v.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    sup = np.concatenate([w, z])
    p = soft(sup @ w.T + b)
    lab = p.argmax(1)
    ent = -(p * np.log(p)).sum(1)
    protos = np.zeros((K, w.shape[1]))
    for k in range(K):
        idx = np.flatnonzero(lab == k)
        idx = idx[np.argsort(ent[idx], kind="stable")][:2]
        s = sup[idx] / np.linalg.norm(sup[idx], axis=1, keepdims=True)
        v = s.sum(0)
        protos[k] = v / max(np.linalg.norm(v), 1e-12)
    np.testing.assert_allclose(logits.numpy(), z @ protos.T, rtol=1e-4, atol=1e-5)
    assert adapter.labels.sum(0).max() <= 2
    adapter.reset()
    assert len(adapter.supports) == K


def test_t3a_select_and_prototype_helpers():
    sup = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0], [1.0, 1.0]])
    lab = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 0]), 2).float()
    ent = torch.tensor([0.3, 0.1, 0.2, 0.5, 0.05])
    assert select_supports(sup, lab, ent, 1).tolist() == [2, 4]
    assert select_supports(sup, lab, ent, -1).tolist() == [0, 1, 2, 3, 4]
    proto = prototypes(sup, lab)
    c0 = np.array([1, 0]) + np.array([1, 0]) + np.array([1, 1]) / np.sqrt(2)
    np.testing.assert_allclose(proto[0].numpy(), c0 / np.linalg.norm(c0), rtol=1e-6)
    np.testing.assert_allclose(proto[1].numpy(), [0, 1], atol=1e-7)


# --- memo -------------------------------------------------------------------------------------
def test_memo_marginal_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
    p = torch.softmax(logits, 1).numpy().mean(0)
    assert float(marginal_entropy(logits)) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)


def test_augmix_views_are_seeded_in_range_and_varied():
    model = tiny()
    x = model.preprocess([np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))])[0]
    v1 = augment_views(x, model.preprocess, 5, torch.Generator().manual_seed(3))
    v2 = augment_views(x, model.preprocess, 5, torch.Generator().manual_seed(3))
    assert v1.shape == (5, 3, 64, 64)
    torch.testing.assert_close(v1, v2)
    assert not torch.allclose(v1[0], v1[1])
    out = augmix(torch.rand(1, 16, 16), torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1


def test_memo_one_step_per_image_then_reset():
    model, x = tiny("norm"), batch(2)
    method = METHODS.get("memo")()
    opts = method.parse_options({"augmentations": 4, "lr": 0.5, "momentum": 0.0})
    adapter = method.build(copy.deepcopy(model), K, opts, Context(batch_size=2, seed=7))
    source = {n: p.detach().clone() for n, p in trainable(adapter.model).items()}
    logits, _ = adapter.forward_and_adapt(x)
    # after the batch every parameter is back at its source value (episodic per image)
    assert_params(adapter, source, atol=0)
    # by hand for image 1: same views (same generator), one SGD step, predict the image
    g = torch.Generator().manual_seed(7)
    views = [augment_views(img, model.preprocess, 4, g) for img in x]
    ref = method.build(copy.deepcopy(model), K, opts, Context(batch_size=2, seed=7)).model
    params = trainable(ref)
    p = torch.softmax(ref(views[1]), 1).mean(0)
    loss = -(p * p.log()).sum()
    for prm, grad in zip(
        params.values(), torch.autograd.grad(loss, list(params.values())), strict=True
    ):
        prm.data -= 0.5 * grad
    torch.testing.assert_close(logits[1:], ref(x[1:]).detach(), atol=1e-5, rtol=1e-4)


# --- vnl --------------------------------------------------------------------------------------
def test_vnl_neighbour_labels_by_hand():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 5)).astype(np.float32)
    bf = rng.normal(size=(4, 5)).astype(np.float32)
    p = rng.dirichlet(np.ones(K), 3).astype(np.float32)
    bp = rng.dirichlet(np.ones(K), 4).astype(np.float32)
    q = neighbour_labels(*(torch.tensor(a) for a in (f, p, bf, bp)), 2, 0.1, 0.3).numpy()
    allf = np.concatenate([f, bf])
    allp = np.concatenate([p, bp])
    for i in range(3):
        sims = [
            (f[i] @ allf[j] / np.linalg.norm(f[i]) / np.linalg.norm(allf[j]), j)
            for j in range(7)
            if j != i
        ]
        top = sorted(sims, reverse=True)[:2]
        w = np.exp(np.array([s for s, _ in top]) / 0.1)
        w /= w.sum()
        expect = 0.3 * p[i] + 0.7 * sum(wj * allp[j] for wj, (_, j) in zip(w, top, strict=True))
        np.testing.assert_allclose(q[i], expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)


def test_vnl_step_trains_toward_the_refined_labels():
    model, x = tiny(), batch()
    _, adapter = build("vnl", model, optimizer="sgd", lr=0.5, momentum=0.0, neighbours=3)
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        feats = ref.features(x)
        q = neighbour_labels(
            feats, ref.head(feats).softmax(1), feats[:0], feats[:0, :K], 3, 0.1, 0.5
        )
    expected, _ = hand_sgd(model, lambda m: torch.nn.functional.cross_entropy(m(x), q), lr=0.5)
    adapter.forward_and_adapt(x)
    assert_params(adapter, expected, atol=1e-6)
    assert len(adapter.bank) == 1


# --- tttpp ------------------------------------------------------------------------------------
def test_tttpp_alignment_and_rotation_by_hand():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(7, 3))
    ms, cs = rng.normal(size=3), np.cov(rng.normal(size=(3, 10)))
    expect = ((f.mean(0) - ms) ** 2).mean() + ((np.cov(f, rowvar=False) - cs) ** 2).mean()
    got = alignment_loss(*(torch.tensor(a) for a in (f, ms, cs)))
    assert float(got) == pytest.approx(expect, rel=1e-10)
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    r = rotate_batch(x, torch.tensor([1, 2]))
    np.testing.assert_array_equal(r[0, 0].numpy(), np.rot90(x[0, 0].numpy(), 1))
    np.testing.assert_array_equal(r[1, 0].numpy(), np.rot90(x[1, 0].numpy(), 2))


def test_tttpp_step_by_hand_and_needs_its_branch():
    model = tiny()
    with pytest.raises(IncompatibleError, match="tttpp-source"):
        build("tttpp", model)
    branch = attach_branch(model)
    for p in branch.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        branch.source_mean.normal_()
        branch.source_cov.copy_(torch.eye(len(branch.source_mean)))
    x = batch(6)
    _, adapter = build("tttpp", model, optimizer="sgd", lr=0.3, momentum=0.0)
    k = torch.randint(4, (6,), generator=torch.Generator().manual_seed(0))

    def loss_fn(m):
        rot = torch.stack([torch.rot90(img, int(r), (1, 2)) for img, r in zip(x, k, strict=True)])
        aux = torch.nn.functional.cross_entropy(m.tttpp.rotation(m.features(rot)), k)
        f = m.features(x)
        d = f.mean(0) - m.tttpp.source_mean
        c = torch.cov(f.T) - m.tttpp.source_cov
        return aux + d.pow(2).mean() + c.pow(2).mean()

    expected, _ = hand_sgd(model, loss_fn, lr=0.3)
    logits, _ = adapter.forward_and_adapt(x)
    assert_params(adapter, expected, atol=1e-5)
    # TTT++ predicts with the updated model
    torch.testing.assert_close(logits, adapter.model(x), atol=1e-5, rtol=1e-5)


def test_batch_stats_norm_keeps_timm_fused_activation():
    from timm.layers import BatchNormAct2d

    from clinadapt.methods.tta.bn import replace_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(BatchNormAct2d(3, act_layer=torch.nn.ReLU))
    x = torch.randn(6, 3, 4, 4)
    expected = net.train()(x)  # train mode: batch statistics, then the fused ReLU
    replace_batchnorm(net, prior=0.0)
    torch.testing.assert_close(net.eval()(x), expected, atol=1e-5, rtol=1e-5)
    assert (net(x) >= 0).all()
