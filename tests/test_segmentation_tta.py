"""Segmentation test-time adaptation: seg-tent, InTEnt, the protocols and the collapse guard."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from clinadapt.data import load_dataset
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.methods import METHODS, Context
from clinadapt.methods.tta.seg.base import (
    SegAdapter,
    SegCollapseGuard,
    entropy_loss,
    run_seg_stream,
)
from clinadapt.methods.tta.seg.intent import balanced_entropy, candidate_weights
from clinadapt.methods.tta.seg.protocol import run_seg_tta, stream_positions
from clinadapt.segmentation import Prompts, load_segmenter
from clinadapt.segmentation.predict import MaskModel, ProbMap, predict_dataset
from clinadapt.segmentation.prompts import PromptSpec, derive_for
from clinadapt.targets import apply_target


class UNetMasks(nn.Module, MaskModel):
    """A MONAI U-Net (BatchNorm) as a dense mask model: softmax over background + C classes."""

    def __init__(self, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = UNet(2, 1, num_classes + 1, (8, 16), (2,), num_res_units=1, norm="batch")

    def mask_probs(self, images, prompts):
        x = torch.stack([torch.as_tensor(im, dtype=torch.float32)[None] / 255 for im in images])
        probs = self.net(x).softmax(1)
        ids = np.arange(probs.shape[1])
        return [ProbMap(p, True, ids) for p in probs]


@pytest.fixture(scope="module")
def data():
    ds = load_dataset("clinical-shift-seg")
    sub = ds.subset(np.arange(10))
    prompts = [d.prompts for d in derive_for(sub, PromptSpec())]
    return ds, sub, prompts


def _quiet_ctx(batch_size=2, seed=0):
    from clinadapt.progress import set_quiet

    set_quiet(True)
    return Context(batch_size=batch_size, seed=seed)


# --- the mask-model interface and prompt protocol ------------------------------------------


def test_prompt_spec_gives_an_image_the_same_prompts_in_any_view(data):
    ds, _, _ = data
    spec = PromptSpec(kind="box+points", k=3)
    a = derive_for(ds.subset(np.arange(6)), spec, seed=1)
    b = derive_for(ds.subset(np.arange(6)[::-1]), spec, seed=1)
    for i in range(6):
        np.testing.assert_array_equal(a[i].prompts.boxes, b[5 - i].prompts.boxes)
        np.testing.assert_array_equal(a[i].prompts.points, b[5 - i].prompts.points)
    c = derive_for(ds.subset(np.arange(6)), spec, seed=2)
    assert any(
        not np.array_equal(x.prompts.points, y.prompts.points) for x, y in zip(a, c, strict=True)
    )
    assert PromptSpec(kind="none").derive(ds.mask(0), 0).prompts.is_empty
    with pytest.raises(Exception, match="jiter"):
        PromptSpec(jiter=3)


def test_jitter_is_measured_at_1024_pixels_and_training_draws_fresh_prompts():
    spec = PromptSpec()
    assert spec.image_jitter((1024, 1024)) == 20
    assert spec.image_jitter((64, 64)) == 1  # round(20 * 64 / 1024)
    assert spec.image_jitter((300, 512)) == 10
    assert PromptSpec(jitter_reference=None).image_jitter((64, 64)) == 20
    lab = np.zeros((256, 256), dtype=np.uint8)
    lab[100:150, 80:120] = 1
    for seed in range(20):  # 20 px at 1024 -> at most 5 px on a 256 px image
        box = spec.derive(lab, 0, seed).prompts.boxes[0]
        grow = np.array([80 - box[0], 100 - box[1], box[2] - 119, box[3] - 149])
        assert (grow >= 0).all() and (grow <= 5).all()
    rng = np.random.default_rng(0)
    draws = {spec.draw(lab, rng).prompts.boxes.tobytes() for _ in range(10)}
    assert len(draws) > 1  # a fresh jitter per draw
    again = spec.derive(lab, 3, 0).prompts.boxes
    np.testing.assert_array_equal(again, spec.derive(lab, 3, 0).prompts.boxes)


def test_mask_probs_match_predict_and_empty_references_ask_nothing(data):
    _, sub, prompts = data
    seg = load_segmenter("tiny-sam")
    images = [sub.image(i) for i in range(3)]
    maps = seg.mask_probs(images, prompts[:3])
    for im, p, m in zip(images, prompts[:3], maps, strict=True):
        torch.testing.assert_close(m.probs.detach(), seg.predict(seg.embed(im), p).probs)
    empty = Prompts(class_ids=np.zeros(0, dtype=np.int64))
    (m,) = seg.mask_probs(images[:1], [empty])
    assert m.probs.shape == (0, 64, 64) and not m.label_map().any()
    out = seg.predict(seg.embed(images[0]), empty)
    assert out.probs.shape == (0, 64, 64)
    via_call = seg(images[:1], prompts[:1])[0].probs
    torch.testing.assert_close(via_call, maps[0].probs)
    labels = predict_dataset(seg, sub, prompts)
    assert len(labels) == len(sub) and labels[0].shape == (2, 64, 64)


def test_probmap_label_maps_and_entropy():
    p = torch.tensor([[[0.7, 0.2]], [[0.1, 0.3]], [[0.2, 0.5]]])  # softmax (bg, c1, c2)
    m = ProbMap(p, True, np.array([0, 1, 2]))
    np.testing.assert_array_equal(m.label_map(), [[0, 2]])
    want = -(p * p.log()).sum(0)
    torch.testing.assert_close(m.entropy(), want, atol=1e-5, rtol=1e-5)
    s = ProbMap(torch.tensor([[[0.9, 0.4]], [[0.6, 0.3]]]), False, np.array([4, 7]))
    np.testing.assert_array_equal(s.label_map(), [[4, 0]])
    # class masks keep what each prompt gave: overlaps stay, a softmax is one-hot
    two = ProbMap(
        torch.tensor([[[0.9, 0.4]], [[0.6, 0.7]], [[0.2, 0.8]]]), False, np.array([1, 2, 1])
    )
    np.testing.assert_array_equal(two.class_masks(2), [[[True, True]], [[True, True]]])
    np.testing.assert_array_equal(m.class_masks(2), [[[False, False]], [[False, True]]])
    assert entropy_loss([ProbMap(torch.zeros(0, 1, 2), False, np.zeros(0))]) is None


# --- seg-tent -----------------------------------------------------------------------------------


def test_seg_tent_with_a_tiny_step_is_the_source_in_the_sets_own_order(data):
    _, sub, prompts = data
    seg = load_segmenter("tiny-sam")
    apply_target(seg, "norm")
    before = copy.deepcopy(seg.state_dict())
    method = METHODS.get("seg-tent")()
    opts = method.parse_options({"lr": 1e-12})
    for protocol in ("per-shift", "episodic", "continual"):
        res = run_seg_tta(
            method, seg, {"a": sub}, {"a": prompts}, opts, _quiet_ctx(), protocol, "size-sorted"
        )
        want = predict_dataset(seg, sub, prompts)
        for got, ref in zip(res.masks["a"], want, strict=True):
            np.testing.assert_array_equal(got, ref)
        assert res.info["protocol"] == protocol and res.info["stream_sizes"] == {"a": 10}
    for k, v in seg.state_dict().items():  # the source model is never changed
        torch.testing.assert_close(v, before[k])


def test_seg_tent_moves_only_the_target_and_lowers_the_entropy(data):
    _, sub, prompts = data
    seg = load_segmenter("tiny-sam")
    apply_target(seg, "norm")
    method = METHODS.get("seg-tent")()
    opts = method.parse_options({"lr": 1e-2, "steps": 1})
    images = [sub.image(i) for i in range(4)]
    from clinadapt.methods.tta.adapter import collect_params, make_optimizer
    from clinadapt.methods.tta.seg.tent import SegTentAdapter

    own = copy.deepcopy(seg)
    adapter = SegTentAdapter(own, make_optimizer(collect_params(own), opts), steps=1)
    losses = [float(adapter.forward_and_adapt(images, prompts[:4])[1]) for _ in range(8)]
    assert losses[-1] < losses[0]
    changed = {n for n, p in own.named_parameters() if not torch.equal(p, seg.get_parameter(n))}
    trainable = {n for n, p in own.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("layer_norm" in n or "neck" in n for n in changed)


def test_seg_tent_resets_a_diverging_stream_and_counts_it(data):
    _, sub, prompts = data
    seg = load_segmenter("tiny-sam")
    apply_target(seg, "norm")
    method = METHODS.get("seg-tent")()
    opts = method.parse_options({"lr": 1e30, "optimizer": "sgd"})
    ctx = _quiet_ctx()
    res = run_seg_tta(method, seg, {"a": sub}, {"a": prompts}, opts, ctx)
    assert res.info["resets"] >= 1 and res.info["resets_per_set"]["a"] == res.info["resets"]
    assert "non-finite" in res.info["reset_events"][0]["reason"]
    assert all(m.shape == (2, 64, 64) and m.dtype == bool for m in res.masks["a"])


def test_collapse_guard_fires_on_confident_degenerate_masks_only():
    guard = SegCollapseGuard(window=4, entropy_frac=0.05, share=0.95)
    empty = ProbMap(torch.full((1, 8, 8), 1e-4), False, np.array([1]))
    for _ in range(3):
        assert guard.check([empty], 0.1) is None
    assert "collapse" in guard.check([empty], 0.1)
    guard.clear()
    healthy = torch.full((1, 8, 8), 1e-4)
    healthy[0, :4] = 1 - 1e-4  # half the image, confident: not degenerate
    for _ in range(6):
        assert guard.check([ProbMap(healthy, False, np.array([1]))], 0.1) is None
    assert "non-finite" in guard.check([empty], float("nan"))


class EmptyMasks(SegAdapter):
    """Predicts an empty mask for every image with certainty: a collapsed stream."""

    def __init__(self):
        super().__init__(nn.Linear(1, 1), None)
        self.resets = 0

    def on_reset(self):
        self.resets += 1

    def forward_and_adapt(self, images, prompts):
        empty = [ProbMap(torch.full((1, 8, 8), 1e-4), False, np.array([1])) for _ in images]
        return empty, torch.tensor(0.1)


def test_seg_collapse_is_recorded_by_default_and_reset_only_when_asked(data):
    _, sub, prompts = data
    n = len(sub)
    assert METHODS.get("seg-tent")().parse_options({}).guard == "watch"
    watch = EmptyMasks()
    res = run_seg_stream(watch, sub, prompts, _quiet_ctx(), SegCollapseGuard(window=2), "x")
    assert watch.resets == 0 and len(res.masks) == n
    assert [e["kind"] for e in res.events] == ["would-reset"] * len(range(0, n, 2))
    reset = EmptyMasks()
    res = run_seg_stream(reset, sub, prompts, _quiet_ctx(), SegCollapseGuard(window=2), "x", True)
    assert reset.resets == len(range(0, n, 2)) and {e["kind"] for e in res.events} == {"reset"}


def test_segmentation_methods_refuse_classification_streams():
    method = METHODS.get("seg-tent")()
    with pytest.raises(IncompatibleError, match="classification"):
        method.adapt(None, load_dataset("clinical-shift", patients_per_site=10), None, Context())
    assert "segmentation" in METHODS.entry("seg-tent").tags


def test_protocol_errors(data):
    _, sub, prompts = data
    method = METHODS.get("seg-tent")()
    opts = method.parse_options({})
    seg = load_segmenter("tiny-sam")
    with pytest.raises(ConfigError, match="not defined for segmentation"):
        stream_positions(sub, "class-sorted", 0)
    with pytest.raises(ConfigError, match="no prompts"):
        run_seg_tta(method, seg, {"a": sub}, {"a": prompts[:3]}, opts, _quiet_ctx())
    with pytest.raises(ConfigError, match="unknown TTA protocol"):
        run_seg_tta(method, seg, {"a": sub}, {"a": prompts}, opts, _quiet_ctx(), "weekly")
    order = stream_positions(sub, "size-sorted", 0)
    assert (np.diff(sub.areas.sum(1)[order]) >= 0).all()


# --- InTEnt -----------------------------------------------------------------------------------


def _trained_unet(sub) -> UNetMasks:
    """A U-Net whose BatchNorm statistics are those of site images (a few train-mode passes)."""
    model = UNetMasks(sub.num_classes)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.mask_probs([sub.image(i) for i in range(len(sub))], [Prompts()] * len(sub))
    return model.eval()


def test_candidate_weights_by_hand():
    fg_sure = ProbMap(torch.tensor([[[0.99, 0.01, 0.01, 0.99]]]), False, np.array([1]))
    unsure = ProbMap(torch.tensor([[[0.6, 0.4, 0.45, 0.55]]]), False, np.array([1]))

    def h(p):  # binary entropy in bits
        return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))

    assert balanced_entropy(fg_sure) == pytest.approx(0.5 * (h(0.99) + h(0.01)), rel=1e-5)
    want = 0.5 * ((h(0.6) + h(0.55)) / 2 + (h(0.4) + h(0.45)) / 2)
    assert balanced_entropy(unsure) == pytest.approx(want, rel=1e-5)
    w = candidate_weights([fg_sure, unsure], "balanced", 1.0)
    # normalised scores: the surer candidate 1, the other 0 -> softmax(1, 0)
    torch.testing.assert_close(w, torch.softmax(torch.tensor([1.0, 0.0]), 0))
    w2 = candidate_weights([fg_sure, unsure], "entropy", 1.0)
    conf = torch.tensor([1 - h(0.99), 1 - float(np.mean([h(0.6), h(0.4), h(0.45), h(0.55)]))])
    torch.testing.assert_close(w2, torch.softmax(conf.float(), 0), atol=1e-5, rtol=1e-5)


def test_intent_integrates_source_and_test_statistics(data):
    ds, sub, _ = data
    model = _trained_unet(sub)
    before = copy.deepcopy(model.state_dict())
    target = ds.subset(np.flatnonzero(ds.metadata["domain"] == "site-c")[:4])
    prompts = [Prompts()] * len(target)
    method = METHODS.get("intent")()
    ctx = _quiet_ctx(batch_size=1)
    got = method.adapt_masks(model, target, prompts, method.parse_options({}), ctx).masks
    assert len(got) == 4 and got[0].shape == (2, 64, 64)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # by hand for image 0: the six candidates and their weights
    image = target.image(0)
    cands = []
    for r in np.linspace(0, 1, 6):
        m = copy.deepcopy(model)
        own = copy.deepcopy(model)
        for layer in own.modules():  # the image's own statistics: momentum 1, train mode
            if isinstance(layer, nn.BatchNorm2d):
                layer.momentum = 1.0
                layer.train()
        with torch.no_grad():
            own.mask_probs([image], [Prompts()])
        for a, b, c in zip(m.modules(), model.modules(), own.modules(), strict=True):
            if isinstance(a, nn.BatchNorm2d):
                a.running_mean.copy_((1 - r) * b.running_mean + r * c.running_mean)
                a.running_var.copy_((1 - r) * b.running_var + r * c.running_var)
        with torch.no_grad():
            cands.append(m.eval().mask_probs([image], [Prompts()])[0])
    w = candidate_weights(cands, "balanced", 1.0)
    probs = sum(wi * c.probs for wi, c in zip(w, cands, strict=True))
    want = ProbMap(probs, True, cands[0].class_ids).class_masks(2)
    np.testing.assert_array_equal(got[0], want)
    assert not torch.allclose(cands[0].probs, cands[-1].probs)  # the statistics matter


def test_intent_refuses_layernorm_models(data):
    _, sub, prompts = data
    method = METHODS.get("intent")()
    with pytest.raises(IncompatibleError, match="no BatchNorm"):
        method.adapt_masks(
            load_segmenter("tiny-sam"), sub, prompts, method.parse_options({}), _quiet_ctx()
        )


def test_a_test_time_method_that_changes_nothing_scores_exactly_as_its_source(tmp_path):
    """The comparison holds everything else fixed: same prompts, same mask form, same metrics."""
    from clinadapt.config import load_config
    from clinadapt.runner import run_experiment

    small = {
        "model": "tiny-sam",
        "shift": "domain",
        "shift_options": {"source": "site-a", "target_split": "test"},
        "data_options": {"patients_per_site": 6},
        "evaluation": {"n_boot": 5},
        "batch_size": 4,
        "out_dir": str(tmp_path),
    }
    source = run_experiment(load_config(None, method="seg-zeroshot", **small))
    tta = run_experiment(
        load_config(
            None,
            method="seg-tent",
            method_options={"lr": 1e-12},
            source={"method": "seg-zeroshot"},
            stream_order="size-sorted",
            **small,
        )
    )
    assert tta["metrics"].keys() == source["metrics"].keys()
    for name, values in source["metrics"].items():
        for key in ("dice", "iou", "nsd"):
            assert tta["metrics"][name][key] == pytest.approx(values[key], abs=1e-9), (name, key)
