"""Promptable segmenters: every tiny model with every prompt type, cached embeddings, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinadapt.errors import (
    ConfigError,
    DataError,
    IncompatibleError,
    RegistryError,
    WeightsUnavailableError,
)
from clinadapt.segmentation import (
    SEGMENTERS,
    Prompts,
    SegmentationOutput,
    choose_mask,
    list_segmenters,
    load_segmenter,
    make_prompts,
)

TINY = ["tiny-sam", "tiny-medsam", "tiny-sam2"]
PUBLISHED = ["sam-vit-b", "sam-vit-l", "sam-vit-h", "medsam", "sam2-hiera-tiny", "sam2-hiera-small"]


@pytest.fixture(scope="module")
def segmenters():
    return {name: load_segmenter(name) for name in TINY}


def _image(seed: int = 0, shape=(50, 70)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random(shape) * 60).astype(np.uint8)
    img[10:30, 15:45] += 150  # a bright object
    return img


PROMPTS = {
    "box": dict(boxes=[[15, 10, 44, 29]]),
    "point": dict(points=[[30, 20]], point_labels=[1]),
    "points+negative": dict(points=[[30, 20], [60, 45]], point_labels=[1, 0]),
    "box+points": dict(boxes=[[15, 10, 44, 29]], points=[[30, 20]], point_labels=[1]),
    "two boxes": dict(boxes=[[15, 10, 44, 29], [0, 0, 69, 49]]),
}


def test_registry_lists_published_and_tiny_segmenters():
    assert set(PUBLISHED + TINY) <= set(list_segmenters())
    assert SEGMENTERS.get("medsam").rule == "medsam"
    assert SEGMENTERS.get("sam-vit-b").url.endswith("sam_vit_b_01ec64.pth")
    with pytest.raises(RegistryError, match="Did you mean"):
        load_segmenter("medsamm")


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_every_tiny_segmenter_with_every_prompt_type(segmenters, name, kind):
    seg = segmenters[name]
    img = _image()
    out = seg.segment(img, **PROMPTS[kind])
    p = len(np.atleast_2d(PROMPTS[kind].get("boxes", [[0, 0, 0, 0]])))
    assert isinstance(out, SegmentationOutput)
    assert out.probs.shape == (p, 50, 70)
    assert out.masks.dtype == torch.bool
    assert out.scores.shape == (p,)
    assert torch.isfinite(out.probs).all() and (out.probs >= 0).all() and (out.probs <= 1).all()
    low = seg.mask_input_size
    assert out.low_res_logits.shape == (p, low, low)


@pytest.mark.parametrize("name", TINY)
def test_mask_prompt_and_its_refinement(segmenters, name):
    seg = segmenters[name]
    img = _image()
    mask = np.zeros((50, 70), dtype=bool)
    mask[10:30, 15:45] = True
    out = seg.segment(img, mask=mask)
    assert out.probs.shape == (1, 50, 70)
    # an earlier output's logits at image resolution go back in as the mask prompt
    again = seg.segment(img, boxes=[[15, 10, 44, 29]], mask=out.logits)
    assert again.probs.shape == (1, 50, 70)
    other = seg.segment(img, boxes=[[15, 10, 44, 29]])
    assert not torch.allclose(again.probs, other.probs)


@pytest.mark.parametrize("name", TINY)
def test_output_depends_on_image_and_prompt(segmenters, name):
    seg = segmenters[name]
    a = seg.segment(_image(0), boxes=[[15, 10, 44, 29]]).low_res_logits
    b = seg.segment(_image(1), boxes=[[15, 10, 44, 29]]).low_res_logits
    c = seg.segment(_image(0), boxes=[[0, 0, 20, 20]]).low_res_logits
    assert not torch.allclose(a, b, atol=1e-5), "features do not depend on the image"
    assert not torch.allclose(a, c, atol=1e-5), "masks do not depend on the prompt"


@pytest.mark.parametrize("name", TINY)
def test_cached_embedding_gives_the_same_masks_as_a_full_pass(segmenters, name):
    seg = segmenters[name]
    img = _image()
    emb = seg.embed(img)
    for kind in ("box", "point", "box+points"):
        cached = seg.predict(emb, make_prompts(img.shape, **PROMPTS[kind]))
        full = seg.segment(img, **PROMPTS[kind])
        torch.testing.assert_close(cached.probs, full.probs)


def test_tiny_models_are_deterministic():
    a = load_segmenter("tiny-sam").segment(_image(), boxes=[[15, 10, 44, 29]]).probs
    b = load_segmenter("tiny-sam").segment(_image(), boxes=[[15, 10, 44, 29]]).probs
    torch.testing.assert_close(a, b)


def test_single_point_uses_three_masks_and_the_iou_head_chooses(segmenters):
    seg = segmenters["tiny-sam"]
    img = _image()
    emb = seg.embed(img)
    prompts = make_prompts(img.shape, points=[[30, 20]], point_labels=[1])
    with torch.no_grad():
        low, iou = seg.decode_prompts(emb.features, seg.model_prompts(prompts, emb.frame), True)
    assert low.shape[1] == 3
    best = int(iou[0].argmax())
    out = seg.predict(emb, prompts)  # multimask=None: a single point is ambiguous
    torch.testing.assert_close(out.low_res_logits[0], low[0, best])
    torch.testing.assert_close(out.scores[0], iou[0, best])
    single = seg.predict(emb, prompts, multimask=False)
    assert not torch.allclose(single.low_res_logits, out.low_res_logits)


def test_medsam_predicts_one_mask_even_for_a_point(segmenters):
    seg = segmenters["tiny-medsam"]
    img = _image()
    emb = seg.embed(img)
    prompts = make_prompts(img.shape, points=[[30, 20]], point_labels=[1])
    with torch.no_grad():
        low, _ = seg.decode_prompts(emb.features, seg.model_prompts(prompts, emb.frame), False)
    torch.testing.assert_close(seg.predict(emb, prompts).low_res_logits, low[:, 0])


def test_choose_mask_takes_the_highest_iou_per_object():
    low = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    iou = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.1]])
    chosen, score = choose_mask(low, iou)
    torch.testing.assert_close(chosen[0], low[0, 1])
    torch.testing.assert_close(chosen[1], low[1, 0])
    torch.testing.assert_close(score, torch.tensor([0.9, 0.8]))


def test_label_map_gives_each_pixel_its_most_probable_class():
    probs = torch.zeros(2, 2, 3)
    probs[0] = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.4, 0.0]])
    probs[1] = torch.tensor([[0.7, 0.8, 0.2], [0.1, 0.45, 0.7]])
    out = SegmentationOutput(probs, torch.zeros(2), torch.zeros(2, 1, 1), np.array([3, 5]))
    np.testing.assert_array_equal(out.label_map(), [[3, 5, 0], [0, 0, 5]])


@pytest.mark.parametrize("name", TINY)
def test_learned_default_prompt_segments_without_a_prompt(name):
    seg = load_segmenter(name)
    with pytest.raises(IncompatibleError, match="no prompt"):
        seg.segment(_image())
    seg.add_default_prompt(["liver", "kidney"])
    out = seg.segment(_image())
    assert out.probs.shape == (2, 50, 70)
    np.testing.assert_array_equal(out.class_ids, [1, 2])
    # one gradient step on the class-2 prompt changes only class 2's mask
    opt = torch.optim.SGD(seg.default_prompt.parameters(), lr=10.0)
    x, frames = seg.preprocess([_image()])
    feats = seg.encode(x)
    low, _ = seg.decode_prompts(feats, seg.model_prompts(Prompts(), frames[0]))
    low[1].mean().backward()
    opt.step()
    after = seg.segment(_image())
    torch.testing.assert_close(after.probs[0], out.probs[0])
    assert not torch.allclose(after.probs[1], out.probs[1])


def test_training_api_gives_gradients_through_encoder_and_decoder():
    seg = load_segmenter("tiny-sam").train()
    imgs = [_image(0), _image(1, (40, 40))]
    x, frames = seg.preprocess(imgs)
    feats = seg.encode(x)
    loss = 0.0
    for i, frame in enumerate(frames):
        prompts = make_prompts(imgs[i].shape, boxes=[[5, 5, 30, 30]])
        low, _ = seg.decode_prompts(feats[i : i + 1], seg.model_prompts(prompts, frame))
        probs = seg.upsample(low[:, 0], frame)
        assert probs.shape == (1, *imgs[i].shape)
        loss = loss + probs.mean()
    loss.backward()
    assert seg.encoder.patch_embed.projection.weight.grad is not None
    assert seg.mask_decoder.output_hypernetworks_mlps[0].proj_in.weight.grad is not None
    # multimask=False uses mask token 0 only: the other hypernetworks get no gradient
    assert seg.mask_decoder.output_hypernetworks_mlps[1].proj_in.weight.grad.abs().sum() == 0


def test_segment_rejects_bad_images(segmenters):
    seg = segmenters["tiny-sam"]
    with pytest.raises(DataError, match="shape"):
        seg.segment(np.zeros((4, 5, 6, 7), dtype=np.uint8), boxes=[[0, 0, 1, 1]])
    with pytest.raises(DataError, match="NaN"):
        seg.segment(np.full((8, 8), np.nan, dtype=np.float32), boxes=[[0, 0, 1, 1]])
    with pytest.raises(DataError, match="outside"):
        seg.segment(_image(), boxes=[[10, 10, 80, 20]])
    with pytest.raises(DataError, match="point_labels"):
        seg.segment(_image(), points=[[10, 10]])


# --- weights ---------------------------------------------------------------------------------


def test_offline_without_weights_fails_fast_with_the_download_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CLINADAPT_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        load_segmenter("sam-vit-b")
    msg = str(info.value)
    assert "hf download facebook/sam-vit-base" in msg
    assert str(tmp_path / "models" / "sam-vit-b") in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    with pytest.raises(WeightsUnavailableError) as info:
        load_segmenter("medsam")
    assert "wanglab/medsam-vit-base" in str(info.value)
    assert "medsam_vit_b.pth" in str(info.value)


def _save_transformers(seg, directory):
    seg.sam.save_pretrained(str(directory))


@pytest.mark.parametrize(
    ("name", "published"), [("tiny-sam", "sam-vit-b"), ("tiny-sam2", "sam2-hiera-tiny")]
)
def test_transformers_folder_loads_by_weights_and_from_the_model_dir(
    name, published, tmp_path, monkeypatch
):
    src = load_segmenter(name)
    with torch.no_grad():
        for p in src.mask_decoder.parameters():
            p.add_(0.05)
    img = _image()
    want = src.segment(img, boxes=[[15, 10, 44, 29]]).probs
    folder = tmp_path / "elsewhere"
    _save_transformers(src, folder)
    got = load_segmenter(name, weights=folder).segment(img, boxes=[[15, 10, 44, 29]]).probs
    torch.testing.assert_close(got, want)
    # a published name finds the same files in $CLINADAPT_MODEL_DIR/<name>/ (config.json
    # says the architecture: here the tiny one)
    _save_transformers(src, tmp_path / "models" / published)
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", str(tmp_path / "models"))
    seg = load_segmenter(published)
    assert seg.source.startswith("model dir")
    torch.testing.assert_close(seg.segment(img, boxes=[[15, 10, 44, 29]]).probs, want)


def test_weights_conflicts_and_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="pretrained=False"):
        load_segmenter("tiny-sam", weights=tmp_path, pretrained=False)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_segmenter("tiny-sam", weights=tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match=r"neither config\.json"):
        load_segmenter("tiny-sam", weights=tmp_path / "empty")


def test_transformers_keyed_single_file_loads_and_a_wrong_one_is_refused(tmp_path):
    src = load_segmenter("tiny-sam")
    path = tmp_path / "sam.pt"
    torch.save(src.sam.state_dict(), path)
    img = _image()
    got = load_segmenter("tiny-sam", weights=path).segment(img, boxes=[[15, 10, 44, 29]])
    want = src.segment(img, boxes=[[15, 10, 44, 29]])
    torch.testing.assert_close(got.probs, want.probs)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(IncompatibleError, match="do not fit"):
        load_segmenter("tiny-sam", weights=tmp_path / "other.pt")


def test_describe_is_json_able(segmenters):
    d = segmenters["tiny-medsam"].describe()
    json.dumps(d)
    assert d["preprocess"]["rule"] == "medsam" and d["task"] == "segmentation"


@pytest.mark.parametrize("name", TINY)
def test_many_prompts_are_decoded_in_parts_with_the_same_masks(segmenters, name, monkeypatch):
    seg = segmenters[name]
    img = _image()
    rng = np.random.default_rng(0)
    x1, y1 = rng.integers(0, 40, 11), rng.integers(0, 25, 11)
    boxes = np.stack([x1, y1, x1 + rng.integers(5, 29, 11), y1 + rng.integers(5, 24, 11)], 1)
    points = np.stack([(x1 + 2)[:, None], (y1 + 2)[:, None]], -1)
    prompts = make_prompts(img.shape, boxes=boxes, points=points, point_labels=np.ones((11, 1)))
    emb = seg.embed(img)
    monkeypatch.setattr(seg, "prompt_batch", 1000)
    whole = seg.predict(emb, prompts)
    calls = []
    decode = seg.decode_prompts

    def counted(features, part, multimask=False):
        calls.append(part.count)
        return decode(features, part, multimask)

    monkeypatch.setattr(seg, "decode_prompts", counted)
    monkeypatch.setattr(seg, "prompt_batch", 4)
    parts = seg.predict(emb, prompts)
    assert calls == [4, 4, 3]
    close = {"atol": 1e-4, "rtol": 1e-4}  # batched matmuls round differently
    torch.testing.assert_close(parts.probs, whole.probs, **close)
    torch.testing.assert_close(parts.scores, whole.scores, **close)
    torch.testing.assert_close(parts.low_res_logits, whole.low_res_logits, **close)
    with torch.no_grad():  # the inference path of mask_probs (streams, predict_dataset)
        (probs,) = seg.mask_probs([img], [prompts])
    torch.testing.assert_close(probs.probs, whole.probs, **close)


def test_out_of_memory_halves_the_prompt_part_and_keeps_the_masks(segmenters, monkeypatch):
    seg = segmenters["tiny-sam"]
    img = _image()
    boxes = [[15, 10, 44, 29], [0, 0, 20, 20], [5, 5, 60, 40], [30, 20, 69, 49], [1, 1, 9, 9]]
    prompts = make_prompts(img.shape, boxes=boxes)
    emb = seg.embed(img)
    whole = seg.predict(emb, prompts)
    decode, calls = seg.decode_prompts, []

    def small_device(features, part, multimask=False):  # a device that fits two prompts
        calls.append(part.count)
        if part.count > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(features, part, multimask)

    monkeypatch.setattr(seg, "decode_prompts", small_device)
    monkeypatch.setattr(seg, "prompt_batch", 64)
    out = seg.predict(emb, prompts)
    torch.testing.assert_close(out.probs, whole.probs, atol=1e-4, rtol=1e-4)
    assert calls == [5, 2, 2, 1] and seg.prompt_batch == 2

    def no_memory(features, part, multimask=False):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(seg, "decode_prompts", no_memory)
    with pytest.raises(torch.OutOfMemoryError) as err:
        seg.predict(emb, prompts)
    assert "decoding a single prompt" in "".join(err.value.__notes__)
