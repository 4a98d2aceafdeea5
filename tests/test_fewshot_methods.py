"""Frozen-feature heads against hand computations and scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from clinadapt.classifier import ImageClassifier
from clinadapt.errors import IncompatibleError
from clinadapt.methods import METHODS, Context
from clinadapt.methods.frozen import LabelledFeatures, head_logits
from clinadapt.methods.knn import KNNHead
from clinadapt.methods.prototype import PrototypeHead
from clinadapt.methods.tip_adapter import TipAdapterHead, search_alpha_beta
from clinadapt.models import load_model

K = 3


@pytest.fixture(scope="module")
def resnet():
    return ImageClassifier(load_model("tiny-resnet"), K)


@pytest.fixture(scope="module")
def train_info(small_shift):
    """A dataset standing in for the training set: only its class names, task, modality."""
    ds = small_shift.where(domain="site-a")
    keep = np.flatnonzero(ds.labels < K)
    out = ds.subset(keep)
    out.class_names = out.class_names[:K]
    return out


def _features(seed=0, n=40, d=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, d)) * 2
    y = np.arange(n) % K
    x = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    return LabelledFeatures(x, y.astype(np.int64))


def _fit(name, model, support, data, val=None, **options):
    method = METHODS.get(name)()
    opts = method.parse_options(options)
    return method.fit_head(model, support, val, data, opts, Context())


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_prototype_cosine_against_hand_means(resnet, train_info):
    sup, query = _features(0), _features(1, n=9)
    head, summary = _fit("prototype", resnet, sup, train_info)
    logits = head_logits(head, query.x).numpy()
    for i, q in enumerate(query.x):
        for c in range(K):
            members = [x / np.linalg.norm(x) for x, y in zip(sup.x, sup.y, strict=True) if y == c]
            mean = sum(members) / len(members)
            cos = q @ mean / (np.linalg.norm(q) * np.linalg.norm(mean))
            assert logits[i, c] == pytest.approx(10.0 * cos, rel=1e-4)
    assert summary == {"metric": "cosine", "scale": 10.0}


def test_prototype_euclidean_against_hand_means(resnet, train_info):
    sup, query = _features(2), _features(3, n=5)
    head, _ = _fit("prototype", resnet, sup, train_info, metric="euclidean", scale=0.5)
    logits = head_logits(head, query.x).numpy()
    means = np.stack([sup.x[sup.y == c].mean(0) for c in range(K)])
    ref = -0.5 * ((query.x[:, None, :] - means[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_prototype_class_without_support_is_never_predicted(resnet, train_info):
    sup = _features(4)
    keep = sup.y != 1
    head, _ = _fit("prototype", resnet, LabelledFeatures(sup.x[keep], sup.y[keep]), train_info)
    assert (head_logits(head, _features(5).x).argmax(1) != 1).all()


@pytest.mark.parametrize("k", [1, 5, 12])
def test_knn_uniform_votes_match_sklearn(resnet, train_info, k):
    sup, query = _features(6), _features(7, n=15)
    head, summary = _fit("knn", resnet, sup, train_info, k=k, weighting="uniform")
    probs = torch.softmax(head_logits(head, query.x), 1).numpy()
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    np.testing.assert_allclose(probs, ref.fit(sup.x, sup.y).predict_proba(query.x), atol=1e-6)
    assert summary["k"] == k


def test_knn_softmax_weighted_votes_match_sklearn(resnet, train_info):
    sup, query = _features(8), _features(9, n=15)
    t = 0.1
    head, _ = _fit("knn", resnet, sup, train_info, k=7, temperature=t)
    probs = torch.softmax(head_logits(head, query.x), 1).numpy()
    # scikit-learn gives cosine distances 1 - cos; exp(cos / T) up to a common factor
    ref = KNeighborsClassifier(
        n_neighbors=7, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t)
    )
    np.testing.assert_allclose(probs, ref.fit(sup.x, sup.y).predict_proba(query.x), atol=1e-5)


def test_knn_caps_k_at_the_support_size(resnet, train_info):
    sup = _features(10, n=6)
    head, summary = _fit("knn", resnet, sup, train_info)  # default k=20
    assert summary["k"] == 6
    assert torch.isfinite(head_logits(head, _features(11).x)).all()


def test_linear_probe_matches_sklearn(resnet, train_info):
    sup, val, query = _features(12, n=60), _features(13, n=30), _features(14, n=20)
    head, summary = _fit("linear-probe", resnet, sup, train_info, c_grid=[0.01, 1.0], val=val)
    scores = {
        c: balanced_accuracy_score(
            val.y, LogisticRegression(C=c, max_iter=2000).fit(sup.x, sup.y).predict(val.x)
        )
        for c in (0.01, 1.0)
    }
    best_c = max(scores, key=scores.get)  # first best on ties, as the probe
    assert summary["C"] == best_c
    # the probe solves to a gradient of 1e-8; scikit-learn's default tolerance is 1e-4
    x64 = sup.x.astype(np.float64)  # scikit-learn would solve float32 input in float32
    ref = LogisticRegression(C=best_c, max_iter=10000, tol=1e-10).fit(x64, sup.y)
    probs = torch.softmax(head_logits(head, query.x).double(), 1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(query.x.astype(np.float64)), atol=1e-5)
    assert summary["selection"] == "validation"


def test_tip_adapter_blend_on_a_hand_made_cache():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    text = torch.tensor([[0.8, 0.6], [-0.6, 0.8]])
    f = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # normalised inside: (0.6, 0.8), (1, 0)
    alpha, beta, scale = 2.0, 5.5, 100.0
    head = TipAdapterHead(keys, values, text, scale, alpha, beta)
    out = head(f)
    for i, (a, b) in enumerate([(0.6, 0.8), (1.0, 0.0)]):
        sims = [a * ka + b * kb for ka, kb in keys.tolist()]
        aff = [math.exp(-beta * (1 - s)) for s in sims]
        cache = [aff[0], aff[1] + aff[2]]
        clip = [scale * (a * ta + b * tb) for ta, tb in text.tolist()]
        for c in range(2):
            assert float(out[i, c]) == pytest.approx(clip[c] + alpha * cache[c], rel=1e-5)
    cache_only = TipAdapterHead(keys, values, torch.zeros(0, 2), 1.0, alpha, beta)(f)
    ref = alpha * torch.exp(-beta * (1 - torch.nn.functional.normalize(f) @ keys.T)) @ values
    torch.testing.assert_close(cache_only, ref)


def test_alpha_beta_search_matches_brute_force():
    rng = np.random.default_rng(0)
    sup, val = _features(15, n=12), _features(16, n=30)
    n = torch.nn.functional.normalize
    keys = n(torch.from_numpy(sup.x))
    values = torch.nn.functional.one_hot(torch.from_numpy(sup.y), K).float()
    text = n(torch.from_numpy(rng.normal(size=(K, sup.x.shape[1])).astype(np.float32)))
    fv = n(torch.from_numpy(val.x))
    alpha, beta, score = search_alpha_beta(fv, val.y, keys, values, text, 10.0, (7, 3), (10, 5))
    best = (-1.0, None, None)
    for i in range(10):
        b = 0.1 + i * (7 - 0.1) / 10
        for j in range(5):
            a = 0.1 + j * (3 - 0.1) / 5
            logits = 10.0 * fv @ text.T + a * torch.exp(-b * (1 - fv @ keys.T)) @ values
            s = balanced_accuracy_score(val.y, logits.argmax(1).numpy())
            if s > best[0] + 1e-9:
                best = (s, a, b)
    assert score == pytest.approx(best[0])
    assert (alpha, beta) == pytest.approx((best[1], best[2]))


def test_tip_adapter_with_text_uses_zero_shot_weights(train_info):
    from clinadapt.methods.zeroshot import zeroshot_weights

    clip = ImageClassifier(load_model("tiny-clip"), K)
    sup, query = _features(17, d=clip.encoder.feature_dim), _features(18, d=32)
    head, summary = _fit("tip-adapter", clip, sup, train_info, search=False)
    assert summary["zero_shot"] and summary["alpha"] == 1.0 and summary["beta"] == 5.5
    from clinadapt.methods.templates import templates_for

    w = zeroshot_weights(clip.encoder, train_info.class_names, templates_for(train_info.modality))
    f = torch.nn.functional.normalize(torch.from_numpy(query.x))
    keys = torch.nn.functional.normalize(torch.from_numpy(sup.x))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(sup.y), K).float()
    ref = clip.encoder.logit_scale * f @ w.T + torch.exp(-5.5 * (1 - f @ keys.T)) @ onehot
    torch.testing.assert_close(head_logits(head, query.x), ref, rtol=1e-4, atol=1e-4)


def test_tip_adapter_without_text_says_so(resnet, train_info):
    sup = _features(19, d=resnet.encoder.feature_dim)
    head, summary = _fit("tip-adapter", resnet, sup, train_info, val=sup)
    assert summary["zero_shot"] is False and "cache model only" in summary["note"]
    assert not head.has_text


def test_tip_adapter_f_trains_the_keys(resnet, train_info):
    sup, val = _features(20, d=resnet.encoder.feature_dim), _features(21, d=128)
    head, summary = _fit("tip-adapter-f", resnet, sup, train_info, val=val, epochs=5)
    keys0 = torch.nn.functional.normalize(torch.from_numpy(sup.x))
    assert not torch.allclose(head.keys, keys0)
    assert len(summary["history"]) == 5
    assert all("val_balanced_accuracy" in row for row in summary["history"])


@pytest.mark.parametrize("head_type", [PrototypeHead, KNNHead, TipAdapterHead])
def test_heads_rebuild_from_their_checkpoint(resnet, train_info, head_type):
    name = {PrototypeHead: "prototype", KNNHead: "knn", TipAdapterHead: "tip-adapter"}[head_type]
    sup, query = _features(22), _features(23)
    head, _ = _fit(name, resnet, sup, train_info)
    state = {f"head.{k}": v.clone() for k, v in head.state_dict().items()}
    again = head_type.from_state(state)
    torch.testing.assert_close(again(torch.from_numpy(query.x)), head(torch.from_numpy(query.x)))
    with pytest.raises(IncompatibleError, match="no head"):
        head_type.from_state({"encoder.x": torch.zeros(1)})


def test_multilabel_is_refused(resnet, small_shift):
    ds = small_shift.where(domain="site-a")
    multi = type(ds)(
        ds.name,
        ds.source,
        np.eye(4, dtype=int)[ds.labels],
        ds.class_names,
        "multilabel",
        index=ds.index,
    )
    method = METHODS.get("knn")()
    with pytest.raises(IncompatibleError, match="multi-label"):
        method.fit(resnet, multi, None, method.parse_options({}), Context())
