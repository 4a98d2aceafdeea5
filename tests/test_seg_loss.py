"""MedSAM's training loss (squared Dice + binary cross-entropy) against a hand formula."""

from __future__ import annotations

import numpy as np
import torch

from clinadapt.methods.seg.train import dice_bce


def _reference(p: np.ndarray, t: np.ndarray) -> float:
    # MONAI DiceLoss(squared_pred=True): per item 1 - (2 sum(pt) + 1e-5) / (sum p^2 + sum t^2 + 1e-5)
    axes = (1, 2)
    dice = 1 - (2 * (p * t).sum(axes) + 1e-5) / ((p**2).sum(axes) + (t**2).sum(axes) + 1e-5)
    q = np.clip(p, 1e-6, 1 - 1e-6)
    bce = -(t * np.log(q) + (1 - t) * np.log(1 - q)).mean()
    return float(dice.mean() + bce)


def test_dice_bce_matches_the_formula_and_ignores_autocast():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (3, 9, 7)).astype(np.float32)
    t = (rng.uniform(0, 1, (3, 9, 7)) > 0.6).astype(np.float32)
    want = _reference(p.astype(np.float64), t.astype(np.float64))
    got = dice_bce(torch.from_numpy(p), torch.from_numpy(t))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # under autocast (the run's precision) the loss is still the fp32 value, with gradients
    probs = torch.from_numpy(p).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dice_bce(probs, torch.from_numpy(t))
    loss.backward()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert probs.grad is not None and torch.isfinite(probs.grad).all()
