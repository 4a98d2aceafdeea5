"""Shifts on segmentation data: domain/lodo keep masks, corruptions keep them aligned, lesion-mix."""

import numpy as np
import pytest

from clinadapt.data.synthetic_seg import make_clinical_shift_seg
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts import CORRUPTIONS, apply_shift, corrupt, resample_to_prevalence
from clinadapt.shifts.corruptions.base import VOLUME_TAG
from clinadapt.shifts.lesion_mix import size_groups


@pytest.fixture(scope="module")
def seg():
    return make_clinical_shift_seg(seed=0, patients_per_site=30)


def test_domain_and_lodo_keep_masks(seg):
    split = apply_shift(seg, "domain", source="site-a")
    assert set(split.tests) == set(seg.domains)
    b = split.tests["site-b"]
    assert len(b) == int((seg.meta("domain") == "site-b").sum())
    i = int(np.flatnonzero(seg.meta("domain") == "site-b")[3])
    assert np.array_equal(b.mask(3), seg.mask(i)) and np.array_equal(b.image(3), seg.image(i))
    lodo = apply_shift(seg, "lodo", holdout="site-c")
    assert lodo.train.domains == ["site-a", "site-b", "site-d"]
    assert lodo.tests["site-c"].spacing.shape == (len(lodo.tests["site-c"]), 2)


def test_every_corruption_is_photometric_so_masks_stay_aligned(seg):
    """No registered corruption moves anatomy: a geometric one would have to move the mask too.

    Checked on a mask-shaped image: the corrupted image still correlates best with the
    unshifted mask, not with the mask moved by a pixel or two.
    """
    mask = seg.mask(0)
    img = np.where(mask == 1, 60, np.where(mask == 2, 220, 150)).astype(np.uint8)
    for entry in CORRUPTIONS.entries():
        if VOLUME_TAG in entry.tags:  # volume artefacts: tests/test_volume_corruptions.py
            continue
        out = corrupt(img, entry.name, 3, seed=0).astype(float)
        if out.ndim == 3:
            out = out.mean(-1)
        lung = (mask == 1).astype(float)

        def corr(m, out=out):
            return np.corrcoef(out.ravel(), m.ravel())[0, 1]

        here = abs(corr(lung))
        moved = max(abs(corr(np.roll(lung, s, axis=a))) for s in (-2, 2) for a in (0, 1))
        assert here > moved, entry.name
    shifted = apply_shift(seg, "corruption", corruptions=["gaussian-noise", "blur"], severities=[4])
    clean, noisy = shifted.tests["clean"], shifted.tests["blur@4"]
    assert np.array_equal(clean.mask(2), noisy.mask(2)) and not np.array_equal(
        clean.image(2), noisy.image(2)
    )


def test_lesion_mix_resamples_empty_images_and_sizes(seg):
    split = apply_shift(seg, "lesion-mix", empty_fraction=0.6)
    test, mixed = split.tests["test"], split.tests["lesion-mix"]
    assert split.options["cls"] == "lesion" and split.options["groups"][0] == "empty"
    assert split.in_domain == ["test"]
    empty = mixed.areas[:, 1] == 0
    assert empty.mean() == pytest.approx(0.6, abs=0.02)
    assert set(mixed.index.tolist()) <= set(test.index.tolist())  # the same images, resampled
    # the non-empty images keep their size proportions
    g_test, names = size_groups(test, "lesion")
    g_mix, _ = size_groups(mixed, "lesion")
    share = lambda g: np.bincount(g, minlength=len(names))[1:] / max((g > 0).sum(), 1)  # noqa: E731
    assert np.allclose(share(g_mix), share(g_test), atol=0.1)
    # an explicit mix over the groups
    by_mix = apply_shift(seg, "lesion-mix", mix={"empty": 0.2, ">=30 mm": 0.8}, seed=1)
    g, _ = size_groups(by_mix.tests["lesion-mix"], "lesion")
    assert np.bincount(g, minlength=4).tolist()[1:3] == [0, 0]
    assert (g == 0).mean() == pytest.approx(0.2, abs=0.03)


def test_lesion_mix_errors(seg):
    with pytest.raises(ConfigError, match="either mix"):
        apply_shift(seg, "lesion-mix")
    with pytest.raises(ConfigError, match="unknown group"):
        apply_shift(seg, "lesion-mix", mix={"tiny": 1.0})
    with pytest.raises(ConfigError, match="class 'heart'"):
        apply_shift(seg, "lesion-mix", empty_fraction=0.5, cls="heart")
    with pytest.raises(DataError, match="no images of group"):
        apply_shift(seg, "lesion-mix", mix={"<10 mm": 1.0})
    with pytest.raises(DataError, match="use the lesion-mix shift"):
        resample_to_prevalence(seg, [0.5, 0.5])
    with pytest.raises(DataError, match="needs segmentation data"):
        from clinadapt.data.synthetic import make_clinical_shift

        apply_shift(make_clinical_shift(patients_per_site=5), "lesion-mix", empty_fraction=0.5)
