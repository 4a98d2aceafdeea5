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
    step = adapter.forward_and_adapt(x)
    logits, loss = step.logits, step.loss
    assert (step.updates, step.used, step.reliable, step.recovery) == (1, 8, None, None)
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


def test_tent_sgd_is_nesterov_as_in_the_authors_config():
    """Two SGD steps with momentum: Nesterov's look-ahead, written out by hand."""
    model, x1, x2 = tiny(), batch(seed=1), batch(seed=2)
    lr, mom = 0.1, 0.9
    method = METHODS.get("tent")()
    assert method.parse_options({}).nesterov is True
    assert METHODS.get("eata")().parse_options({}).nesterov is False  # EATA and SAR: plain SGD
    assert METHODS.get("sar")().parse_options({}).nesterov is False
    ref = copy.deepcopy(model).train()
    params = trainable(ref)
    bufs = {}
    for x in (x1, x2):
        grads = torch.autograd.grad(entropy_ref(ref(x)).mean(), list(params.values()))
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads, strict=True):
                bufs[n] = g.clone() if n not in bufs else mom * bufs[n] + g
                p -= lr * (g + mom * bufs[n])  # Nesterov: step along g + momentum * buffer
    expected = {n: p.detach() for n, p in params.items()}
    _, adapter = build("tent", model, optimizer="sgd", lr=lr, momentum=mom)
    adapter.forward_and_adapt(x1)
    adapter.forward_and_adapt(x2)
    assert_params(adapter, expected, atol=1e-6)
    _, plain = build("tent", model, optimizer="sgd", lr=lr, momentum=mom, nesterov=False)
    plain.forward_and_adapt(x1)
    plain.forward_and_adapt(x2)
    moved = trainable(plain.model)
    assert any(not torch.allclose(moved[n], expected[n], atol=1e-6) for n in expected)


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
def test_blended_bn_statistics_under_bf16_autocast():
    from clinadapt.methods.tta.bn import BatchStatsNorm

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([1.5, 0.5, 3.0]))
    norm = BatchStatsNorm(bn, prior=0.25)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    ref = norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 input, as after an autocast conv
        mean, var = norm.blend(x.bfloat16(), 0.25)
        y = norm(x.bfloat16())
    assert mean.dtype == var.dtype == torch.float32
    xb = x.bfloat16().float()  # the same statistics, by hand, from the bf16 values
    m = xb.mean((0, 2, 3))
    v = xb.var((0, 2, 3), unbiased=True)
    assert torch.allclose(mean, 0.75 * m + 0.25 * bn.running_mean, atol=1e-5)
    assert torch.allclose(var, 0.75 * v + 0.25 * bn.running_var, atol=1e-4)
    assert torch.allclose(y.float(), ref, atol=0.05)


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
    step = adapter.forward_and_adapt(x)
    assert_params(adapter, expected, atol=1e-6)
    assert adapter.average is not None
    assert (step.used, step.reliable, step.updates) == (6, 6, 1)
    with pytest.raises(ConfigError, match="Fisher"):
        METHODS.get("eata")().prepare(model, None, opts, ctx)


def test_eata_counts_its_filtered_samples_by_hand():
    """The published margin 0.4 ln K on an uncertain model: few samples pass, none may update."""
    model, x = tiny(), batch(16)
    _, adapter = build("eata", model, fisher_alpha=0.0)
    with torch.no_grad():
        ent = entropy_ref(copy.deepcopy(model).train()(x))
    reliable = int((ent < 0.4 * math.log(K)).sum())
    step = adapter.forward_and_adapt(x)
    assert step.reliable == reliable
    assert step.used == reliable  # no moving average yet: the redundancy filter passes all
    assert step.updates == int(reliable > 0)


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


def test_sar_recovery_resets_and_is_counted_apart_from_resets():
    model = tiny()
    stream = make_clinical_shift(seed=0, patients_per_site=5).subset(range(24))
    method = METHODS.get("sar")()
    # a reset constant above any entropy: every update triggers the recovery
    opts = method.parse_options({"e_margin": 1.0, "reset_constant": 100.0})
    res = method.adapt(model, stream, opts, Context(batch_size=8))
    assert res.probs.shape == (24, K)
    assert [e["kind"] for e in res.events] == ["recovery"] * 3
    assert all("sar recovery" in e["reason"] for e in res.events)
    assert [e["position"] for e in res.events] == [0, 8, 16]
    assert [r["recovery"] for r in res.trace] == [1, 1, 1]
    assert [r["reset"] for r in res.trace] == [0, 0, 0]  # the collapse guard did nothing


def test_sar_moving_average_survives_a_recovery_as_in_the_authors_code():
    model, x = tiny(), batch()
    _, adapter = build("sar", model, lr=0.5, momentum=0.0, e_margin=1.0, reset_constant=100.0)
    source = {n: p.detach().clone() for n, p in trainable(adapter.model).items()}
    step = adapter.forward_and_adapt(x)
    assert step.recovery and "< 100.000" in step.recovery
    assert_params(adapter, source, atol=0)  # the recovery restored the source model
    assert adapter.ema is not None and adapter.ema < 100  # ... but kept its moving average
    _, clear = build(
        "sar", model, lr=0.5, momentum=0.0, e_margin=1.0, reset_constant=100.0,
        ema_after_reset="clear",
    )  # fmt: skip
    clear.forward_and_adapt(x)
    assert clear.ema is None


def test_sar_steps_without_reliable_samples_as_in_the_authors_code():
    """With nothing reliable the gradient is zero, but SGD's momentum still moves the weights."""
    model, x = tiny(), batch()
    lr, mom = 0.5, 0.9
    _, adapter = build("sar", model, lr=lr, momentum=mom, e_margin=1.0, rho=0.0)
    _, skip = build(
        "sar", model, lr=lr, momentum=mom, e_margin=1.0, rho=0.0, step_without_reliable=False
    )
    start = {n: p.detach().clone() for n, p in trainable(adapter.model).items()}
    first = adapter.forward_and_adapt(x)
    skip.forward_and_adapt(x)
    after_one = {n: p.detach().clone() for n, p in trainable(adapter.model).items()}
    # SGD's first step: buffer = g, w1 = w0 - lr g; a second step with g = 0: w2 = w1 - lr mom g
    g = {n: (start[n] - after_one[n]) / lr for n in start}
    adapter.margin = skip.margin = 0.0  # no sample can be reliable now
    second = adapter.forward_and_adapt(x)
    assert (first.used, first.reliable, first.updates) == (8, 8, 1)
    assert (second.used, second.reliable, second.updates) == (0, 0, 1)
    assert_params(adapter, {n: after_one[n] - lr * mom * g[n] for n in g}, atol=1e-6)
    assert skip.forward_and_adapt(x).updates == 0
    assert_params(skip, after_one, atol=1e-6)


def test_sar_reset_threshold_scaled_with_log_k():
    from clinadapt.methods.tta.sar import reset_threshold

    sar = METHODS.get("sar")()
    published = sar.parse_options({})
    scaled = sar.parse_options({"reset_rule": "log_k"})
    assert (published.reset_rule, published.reset_constant) == ("fixed", 0.2)
    assert reset_threshold(published, 2) == 0.2
    # the published 0.2 at K = 1000 is 0.2 / (0.4 ln 1000) = 7.2% of the margin; log_k keeps that
    assert reset_threshold(scaled, 2) == pytest.approx(0.2 * math.log(2) / math.log(1000))
    assert reset_threshold(scaled, 1000) == pytest.approx(0.2)
    assert reset_threshold(scaled, 2) / (0.4 * math.log(2)) == pytest.approx(
        0.2 / (0.4 * math.log(1000))
    )
    _, adapter = build("sar", tiny(), reset_rule="log_k")
    assert adapter.threshold == pytest.approx(0.2 * math.log(K) / math.log(1000))


# --- t3a --------------------------------------------------------------------------------------
def test_t3a_prototypes_by_hand():
    model, x = tiny("head"), batch(6)
    method = METHODS.get("t3a")()
    adapter = method.build(
        copy.deepcopy(model).eval(), K, method.parse_options({"filter_k": 2}), Context()
    )
    logits = adapter.forward_and_adapt(x).logits
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
    step = adapter.forward_and_adapt(x)
    logits = step.logits
    assert step.updates == 2  # one step per image
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
    logits = adapter.forward_and_adapt(x).logits
    assert_params(adapter, expected, atol=1e-5)
    # TTT++ predicts with the updated model
    torch.testing.assert_close(logits, adapter.model(x), atol=1e-5, rtol=1e-5)


def test_bn_blend_uses_the_unbiased_variance_as_schneider_et_al():
    """Schneider et al.'s code: a momentum-1 BatchNorm's running_var (unbiased) in the blend."""
    from clinadapt.methods.tta.bn import BatchStatsNorm

    torch.manual_seed(0)
    src = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        src.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        src.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        src.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        src.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.randn(4, 3, 2, 2)
    stats = torch.nn.BatchNorm2d(3, affine=False, momentum=1.0).train()
    stats(x)  # its running statistics are now the batch's, variance unbiased
    for prior in (0.0, 0.3):
        mean = prior * src.running_mean + (1 - prior) * stats.running_mean
        var = prior * src.running_var + (1 - prior) * stats.running_var
        shape = (1, 3, 1, 1)
        expected = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + src.eps)
        expected = expected * src.weight.view(shape) + src.bias.view(shape)
        got = BatchStatsNorm(src, prior, "unbiased")(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # the default rule: a blend is unbiased, pure batch statistics are train-mode BatchNorm
    train_mode = torch.nn.functional.batch_norm(x, None, None, src.weight, src.bias, True)
    torch.testing.assert_close(BatchStatsNorm(src, 0.0)(x), train_mode.detach())
    torch.testing.assert_close(
        BatchStatsNorm(src, 0.3)(x), BatchStatsNorm(src, 0.3, "unbiased")(x), atol=0, rtol=0
    )
    biased = BatchStatsNorm(src, 0.3, "biased")(x)
    assert not torch.allclose(biased, BatchStatsNorm(src, 0.3)(x))
    assert METHODS.get("bn")().parse_options({}).variance == "unbiased"


def test_bn_blend_statistics_are_constants_for_the_gradient():
    """As MEMO and Schneider et al. write them into buffers: no gradient through the blend."""
    from clinadapt.methods.tta.bn import BatchStatsNorm

    torch.manual_seed(1)
    src = torch.nn.BatchNorm2d(2).eval()
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    norm = BatchStatsNorm(src, 0.5)
    mean, var = norm.blend(x, 0.5)
    (norm(x) ** 2).sum().backward()
    fixed = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.batch_norm(fixed, mean, var, src.weight, src.bias, False)
    (ref**2).sum().backward()
    torch.testing.assert_close(x.grad, fixed.grad)
    # a single image with 1x1 maps has no unbiased variance: the biased one (0) is used
    one = torch.randn(1, 2, 1, 1)
    assert torch.isfinite(BatchStatsNorm(src, 0.0)(one)).all()


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
