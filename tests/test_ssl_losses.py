"""SSL losses and schedules against hand-written reference computations."""

import math

import numpy as np
import pytest
import torch

from clinadapt.ssl.dino import DINOOptions, dino_loss, teacher_momentum, teacher_temperature
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.mae import masked_patch_loss, patchify, random_masking, sincos_pos_embed
from clinadapt.ssl.simclr import nt_xent


def _nt_xent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """SimCLR's loss written as in the paper: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = i + n if i < n else i - n
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_reference(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    got = nt_xent(z1, z2, t).item()
    assert got == pytest.approx(_nt_xent_reference(z1.numpy(), z2.numpy(), t), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_symmetric():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g)
    same = nt_xent(z, z + 1e-3 * torch.randn(8, 16, generator=g), 0.1).item()
    rand = nt_xent(z, torch.randn(8, 16, generator=g), 0.1).item()
    assert same < 0.1 < rand
    z2 = torch.randn(8, 16, generator=g)
    assert nt_xent(z, z2, 0.3).item() == pytest.approx(nt_xent(z2, z, 0.3).item(), rel=1e-6)


def _dino_reference(student, teacher, center, ts, tt):
    """The DINO loss with explicit softmax formulas and loops, in float64 numpy."""

    def softmax(a):
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    total, n_terms = 0.0, 0
    for iq, t in enumerate(teacher):
        q = softmax((t - center) / tt)
        for v, s in enumerate(student):
            if v == iq:
                continue
            log_p = np.log(softmax(s / ts))
            total += np.mean(np.sum(-q * log_p, axis=1))
            n_terms += 1
    return total / n_terms


def test_dino_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 10, generator=g, dtype=torch.float64) for _ in range(5)]
    teacher = [torch.randn(4, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 10, generator=g, dtype=torch.float64)
    got = dino_loss(student, teacher, center, 0.1, 0.04).item()
    ref = _dino_reference(
        [s.numpy() for s in student], [t.numpy() for t in teacher], center.numpy(), 0.1, 0.04
    )
    assert got == pytest.approx(ref, rel=1e-9)
    # 2 teacher views x 5 student views minus the 2 same-crop pairs = 8 terms; no grad to teacher
    t = [x.clone().requires_grad_() for x in teacher]
    dino_loss(student, t, center, 0.1, 0.04)
    assert all(x.grad is None for x in t)


def test_dino_schedules_follow_the_paper():
    o = DINOOptions(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_frac=0.3)
    assert teacher_temperature(o, 0, 100) == pytest.approx(0.04)
    assert teacher_temperature(o, 15, 100) == pytest.approx(0.055)
    assert teacher_temperature(o, 30, 100) == pytest.approx(0.07)
    assert teacher_temperature(o, 99, 100) == pytest.approx(0.07)
    # momentum: 1 - (1 - m0) (cos(pi k / K) + 1) / 2
    assert teacher_momentum(o, 0, 100) == pytest.approx(0.996)
    assert teacher_momentum(o, 50, 100) == pytest.approx(0.998)
    assert teacher_momentum(o, 100, 100) == pytest.approx(1.0)


def test_patchify_matches_unfold():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, (8, 8))
    # unfold gives (N, C*ph*pw, L) with channel-major patch vectors; reorder to (ph, pw, C)
    u = torch.nn.functional.unfold(x, kernel_size=8, stride=8)
    u = u.view(2, 3, 8, 8, -1).permute(0, 4, 2, 3, 1).reshape(2, -1, 8 * 8 * 3)
    assert p.shape == (2, 6, 192)
    assert torch.equal(p, u)


def test_random_masking_keeps_a_quarter_and_restores_order():
    keep, restore, mask = random_masking(16, 0.75, ImageDraws.seeded(0, 3))
    assert keep.shape == (3, 4) and mask.shape == (3, 16)
    assert torch.all(mask.sum(1) == 12)
    for i in range(3):
        assert torch.all(mask[i, keep[i]] == 0)  # kept patches are the unmasked ones
        assert sorted(restore[i].tolist()) == list(range(16))


def test_masked_patch_loss_reference():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float32)
    rows = [(i, j) for i in range(2) for j in range(5) if mask[i, j]]
    ref = np.mean([np.mean((pred[i, j].numpy() - target[i, j].numpy()) ** 2) for i, j in rows])
    assert masked_patch_loss(pred, target, mask, False).item() == pytest.approx(ref, rel=1e-6)
    refn = []
    for i, j in rows:
        t = target[i, j].numpy().astype(np.float64)
        t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
        refn.append(np.mean((pred[i, j].numpy() - t) ** 2))
    assert masked_patch_loss(pred, target, mask, True).item() == pytest.approx(
        np.mean(refn), rel=1e-5
    )


def test_sincos_pos_embed_formula():
    e = sincos_pos_embed(8, (2, 3))
    assert e.shape == (6, 8)
    # token (row 1, col 2): first half encodes the row, second half the column
    omega = [1.0, 1.0 / 100.0]
    row, col = 1.0, 2.0
    want = [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    want += [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    assert e[1 * 3 + 2].tolist() == pytest.approx(want, rel=1e-6)
