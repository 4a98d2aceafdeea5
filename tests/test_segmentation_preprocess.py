"""Each segmenter's preprocessing rule, checked against the published scripts' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clinadapt.errors import DataError
from clinadapt.segmentation.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    frame_for,
    mask_to_model,
    medsam_rule,
    prepare_image,
    sam2_rule,
    sam_rule,
    to_unit_range,
    upsample,
)


def test_sam_resizes_the_longest_side_pads_and_uses_imagenet_statistics():
    rule = sam_rule(1024)
    img = np.full((600, 800), 128, dtype=np.uint8)
    x, frame = prepare_image(img, rule)
    assert frame.resized == (768, 1024)  # 600 * 1024 / 800
    assert x.shape == (3, 1024, 1024)
    for c in range(3):  # segment-anything: (x - 123.675) / 58.395 etc. on 0-255 pixels
        want = (128 - 255 * IMAGENET_MEAN[c]) / (255 * IMAGENET_STD[c])
        torch.testing.assert_close(x[c, :768], torch.full((768, 1024), want), atol=1e-4, rtol=0)
    assert (x[:, 768:] == 0).all()  # zero padding after normalisation, bottom only


def test_medsam_squashes_to_1024_min_max_scales_and_skips_imagenet():
    rule = medsam_rule(1024)
    rng = np.random.default_rng(0)
    img = (rng.random((300, 500)) * 100 + 50).astype(np.uint8)
    x, frame = prepare_image(img, rule)
    assert frame.resized == (1024, 1024) and x.shape == (3, 1024, 1024)
    assert float(x.min()) == 0.0 and float(x.max()) == pytest.approx(1.0)
    # MedSAM_Inference.py: box_1024 = box / [W, H, W, H] * 1024
    box = torch.tensor([[10.0, 20.0, 120.0, 140.0]])
    want = box / torch.tensor([500.0, 300.0, 500.0, 300.0]) * 1024
    torch.testing.assert_close(frame.boxes_to_model(box), want)


def test_sam2_squashes_and_uses_imagenet_statistics():
    x, frame = prepare_image(np.full((30, 90, 3), 255, dtype=np.uint8), sam2_rule(64))
    assert frame.resized == (64, 64)
    for c in range(3):
        want = (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(x[c], torch.full((64, 64), want), atol=1e-5, rtol=0)


def test_ct_is_windowed_at_level_40_width_400():
    hu = np.array([[-1000.0, -160.0, 40.0], [240.0, 1000.0, 140.0]], dtype=np.float32)
    got = to_unit_range(hu, "CT", medsam_rule())
    np.testing.assert_allclose(got, [[0.0, 0.0, 0.5], [1.0, 1.0, 0.75]], atol=1e-6)


def test_other_raw_modalities_are_clipped_to_the_nonzero_percentiles():
    rng = np.random.default_rng(1)
    mr = rng.gamma(2.0, 100.0, size=(40, 40)).astype(np.float32)
    mr[:5] = 0.0  # background stays 0
    got = to_unit_range(mr, "MR", medsam_rule())
    lo, hi = np.percentile(mr[mr > 0], [0.5, 99.5])  # MedSAM pre_CT_MR.py
    want = (np.clip(mr, lo, hi) - lo) / (hi - lo)
    want[mr == 0] = 0.0
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (got[:5] == 0).all()


def test_uint8_and_unit_floats_are_taken_as_display_ready():
    img = np.array([[0, 51, 255]], dtype=np.uint8)
    np.testing.assert_allclose(to_unit_range(img, "CT", sam_rule()), [[0.0, 0.2, 1.0]])
    unit = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(to_unit_range(unit, None, sam_rule()), unit)


def test_grey_images_follow_the_replicate_rule():
    grey = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    x_grey, _ = prepare_image(grey, sam_rule(64))
    x_rgb, _ = prepare_image(np.repeat(grey[..., None], 3, axis=2), sam_rule(64))
    torch.testing.assert_close(x_grey, x_rgb)
    x_rgba, _ = prepare_image(np.concatenate([grey[..., None]] * 4, axis=2), sam_rule(64))
    torch.testing.assert_close(x_rgba, x_rgb)


def test_bad_images_are_refused_by_name():
    with pytest.raises(DataError, match="empty"):
        frame_for((0, 10), sam_rule())
    with pytest.raises(DataError, match="shape"):
        prepare_image(np.zeros((5, 5, 2), dtype=np.uint8), sam_rule(64))
    with pytest.raises(DataError, match="dtype"):
        prepare_image(np.zeros((5, 5), dtype=bool), sam_rule(64))


def test_medsam_upsamples_probabilities_and_sam_logits():
    frame = frame_for((50, 70), medsam_rule(64))
    low = torch.randn(2, 16, 16) * 4
    # MedSAM_Inference.py: sigmoid, interpolate (bilinear) to (H, W), > 0.5
    want = F.interpolate(
        torch.sigmoid(low)[:, None], (50, 70), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(upsample(low, frame, medsam_rule(64)), want[:, 0])
    frame2 = frame_for((50, 70), sam2_rule(64))
    want2 = torch.sigmoid(
        F.interpolate(low[:, None], (50, 70), mode="bilinear", align_corners=False)
    )
    torch.testing.assert_close(upsample(low, frame2, sam2_rule(64)), want2[:, 0])


def test_mask_prompts_follow_the_image_into_the_model_frame():
    rule = sam_rule(64)
    frame = frame_for((32, 64), rule)  # resized (32, 64), padded below to 64x64
    mask = torch.full((1, 32, 64), -4.0)
    mask[:, :, :32] = 4.0  # left half foreground
    low = mask_to_model(mask, frame, 16, rule)
    assert low.shape == (1, 1, 16, 16)
    assert (low[0, 0, :8, :7] > 0).all() and (low[0, 0, :8, 9:] < 0).all()
    assert (low[0, 0, 9:] < 0).all()  # the padding is background
