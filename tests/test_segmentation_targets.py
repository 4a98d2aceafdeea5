"""Targets on SAM: trainable counts against hand counts and against segment-anything's modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinadapt.errors import IncompatibleError
from clinadapt.segmentation import load_segmenter
from clinadapt.targets import apply_target, load_adapted, save_adapted
from test_segmentation_checkpoint import tiny_segment_anything

D = 32  # tiny-sam: decoder/prompt width 32, encoder width 32, 2 encoder blocks, mlp_dim 64


def _linear(i: int, o: int) -> int:
    return i * o + o


def decoder_by_hand(d: int = D, mlp: int = 64, layers: int = 2, iou_hidden: int = 32) -> int:
    """SAM's MaskDecoder at width d (segment-anything mask_decoder.py / transformer.py)."""
    half = d // 2  # attention_downsample_rate 2 in the cross attentions
    self_attn = 4 * _linear(d, d)
    cross = 3 * _linear(d, half) + _linear(half, d)
    block = self_attn + 2 * cross + 4 * 2 * d + _linear(d, mlp) + _linear(mlp, d)
    transformer = layers * block + cross + 2 * d
    tokens = d + 4 * d  # IoU token, 3 + 1 mask tokens
    upscale = (d * (d // 4) * 4 + d // 4) + 2 * (d // 4) + ((d // 4) * (d // 8) * 4 + d // 8)
    hyper = 4 * (2 * _linear(d, d) + _linear(d, d // 8))
    iou = _linear(d, iou_hidden) + _linear(iou_hidden, iou_hidden) + _linear(iou_hidden, 4)
    return transformer + tokens + upscale + hyper + iou


def prompt_encoder_by_hand(d: int = D, mask_chans: int = 8) -> int:
    """Point/box/mask embeddings; the Fourier matrix is a buffer (not trained) as in SAM."""
    q = mask_chans // 4
    embeds = 4 * d + d + d  # 4 point/corner types, not-a-point, no-mask
    convs = (q * 4 + q) + (mask_chans * q * 4 + mask_chans) + (d * mask_chans + d)
    return embeds + convs + 2 * q + 2 * mask_chans


def test_decoder_and_prompt_encoder_counts_match_hand_counts_and_segment_anything():
    seg = load_segmenter("tiny-sam")
    info = apply_target(seg, "decoder")
    assert info.trainable == decoder_by_hand() == 40608
    sa = tiny_segment_anything()
    assert info.trainable == sum(p.numel() for p in sa.mask_decoder.parameters())
    info = apply_target(load_segmenter("tiny-sam"), "prompt-encoder")
    assert info.trainable == prompt_encoder_by_hand() == 582
    assert info.trainable == sum(p.numel() for p in sa.prompt_encoder.parameters())
    full = apply_target(load_segmenter("tiny-sam"), "full")
    assert full.trainable == full.total == sum(p.numel() for p in sa.parameters())
    enc = apply_target(load_segmenter("tiny-sam"), "image-encoder")
    assert enc.trainable == sum(p.numel() for p in sa.image_encoder.parameters())
    both = apply_target(load_segmenter("tiny-sam"), "image-encoder+decoder")  # MedSAM
    assert both.trainable == enc.trainable + decoder_by_hand()


def test_lora_on_the_image_encoder_counts_rank_times_in_plus_out_per_block():
    seg = load_segmenter("tiny-sam")
    info = apply_target(seg, "lora", {"rank": 4})
    # peft on each block's fused qkv (32 -> 96): r * (32 + 96); 2 blocks
    assert info.trainable == 2 * 4 * (32 + 96)
    names = [n for n, p in seg.named_parameters() if p.requires_grad]
    assert names and all("vision_encoder.layers" in n and "lora_" in n for n in names)
    samed = apply_target(load_segmenter("tiny-sam"), "lora+decoder+prompt-encoder")
    assert samed.trainable == 2 * 8 * 128 + decoder_by_hand() + prompt_encoder_by_hand()


def test_medical_sam_adapter_counts_and_placement():
    seg = load_segmenter("tiny-sam")
    img = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    before = seg.segment(img, boxes=[[5, 5, 30, 30]]).low_res_logits
    info = apply_target(seg, "sam-adapter")
    h = int(D * 0.25)
    per_adapter = _linear(D, h) + _linear(h, D)
    assert info.trainable == 2 * 2 * per_adapter  # two adapters in each of 2 blocks
    assert info.options == {"mlp_ratio": 0.25, "scale": 0.5, "zero_init": False}
    after = seg.segment(img, boxes=[[5, 5, 30, 30]]).low_res_logits
    assert not torch.allclose(before, after)  # Med-SA's default init changes the output
    zero = load_segmenter("tiny-sam")
    apply_target(zero, "sam-adapter", {"zero_init": True})
    torch.testing.assert_close(zero.segment(img, boxes=[[5, 5, 30, 30]]).low_res_logits, before)


def test_adapter_hooks_compute_the_published_block():
    """One block by hand: x + attn' + mlp(norm2(x')) + 0.5 * A_mlp(norm2(x')), attn' = a + A(a)."""
    seg = load_segmenter("tiny-sam")
    apply_target(seg, "sam-adapter")
    block = seg.encoder.layers[1]  # a global-attention block (no windows)
    x = torch.randn(1, 8, 8, D)
    with torch.no_grad():
        a = block.attn.__class__.forward(block.attn, block.layer_norm1(x))[0]
        a = a + block.sam_attn_adapter.fc2(torch.nn.functional.gelu(block.sam_attn_adapter.fc1(a)))
        h = x + a
        n = block.layer_norm2(h)
        mlp = block.mlp.lin2(block.mlp.act(block.mlp.lin1(n)))
        ad = block.sam_mlp_adapter
        want = h + mlp + 0.5 * ad.fc2(torch.nn.functional.gelu(ad.fc1(n)))
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sam", "tiny-medsam", "tiny-sam2"])
@pytest.mark.parametrize(
    "target", ["decoder", "prompt-encoder", "lora", "sam-adapter", "norm", "bias", "full"]
)
def test_every_target_trains_on_every_tiny_segmenter(name, target):
    seg = load_segmenter(name)
    info = apply_target(seg, target)
    assert 0 < info.trainable <= info.total
    seg.train()
    x, frames = seg.preprocess([(np.random.default_rng(1).random((40, 40)) * 255).astype(np.uint8)])
    from clinadapt.segmentation import make_prompts

    mp = seg.model_prompts(make_prompts((40, 40), boxes=[[5, 5, 30, 30]]), frames[0])
    low, _ = seg.decode_prompts(seg.encode(x), mp)
    low.mean().backward()
    grads = [p.grad for p in seg.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in seg.parameters() if not p.requires_grad)


def test_segmenter_targets_refuse_classifiers():
    from clinadapt.classifier import ImageClassifier
    from clinadapt.models import load_model

    clf = ImageClassifier(load_model("tiny-vit"), 2)
    with pytest.raises(IncompatibleError, match="promptable segmenter"):
        apply_target(clf, "decoder")


def test_adapted_weights_round_trip_with_lora_and_a_default_prompt(tmp_path):
    seg = load_segmenter("tiny-sam")
    seg.add_default_prompt(["lesion"])
    info = apply_target(seg, "lora+decoder+prompt-encoder")
    with torch.no_grad():
        for p in seg.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    img = (np.random.default_rng(2).random((40, 40)) * 255).astype(np.uint8)
    want = seg.segment(img).probs
    path = save_adapted(seg, tmp_path / "adapted.safetensors", target=info)
    fresh = load_segmenter("tiny-sam")
    fresh.add_default_prompt(["lesion"])
    meta = load_adapted(fresh, path)
    assert meta["base_model"] == "tiny-sam"
    torch.testing.assert_close(fresh.segment(img).probs, want)
