"""Volume artefacts: five severities, monotone, deterministic, in the SSIM bands, the right dims."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.data.synthetic_3d import make_clinical_shift_3d
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts import apply_shift
from clinadapt.shifts.corruptions import CORRUPTIONS, corrupted, corruptions_for, get_corruption
from clinadapt.shifts.corruptions.base import SEVERITIES, corrupt, corrupt_volume
from clinadapt.shifts.corruptions.calibration import (
    SSIM_BANDS,
    reference_volumes,
    ssim_by_severity,
    ssim_volumes,
)

MRI_3D = [
    "bias-field-3d",
    "ghosting-3d",
    "motion-3d",
    "rician-noise-3d",
    "spike-3d",
    "thick-slices",
]
CT_3D = ["beam-hardening-3d", "ct-noise-3d", "ring-3d", "streak-3d", "thick-slices"]
VOLUME_CORRUPTIONS = sorted(set(MRI_3D) | set(CT_3D))


def test_each_modality_gets_its_volume_artefacts_and_images_keep_theirs():
    assert corruptions_for("mri", 3) == MRI_3D
    assert corruptions_for("ct", 3) == CT_3D
    assert not set(corruptions_for("ct")) & set(VOLUME_CORRUPTIONS)  # 2D list unchanged
    assert all(get_corruption(n).dims == 3 for n in VOLUME_CORRUPTIONS)
    assert {n for n in CORRUPTIONS if get_corruption(n).dims == 3} == set(VOLUME_CORRUPTIONS)
    with pytest.raises(ConfigError, match=r"no volume corruptions.*'xray'"):
        corruptions_for("xray", 3)


@pytest.fixture(scope="module")
def severity_ssim():
    return {name: ssim_by_severity(name) for name in VOLUME_CORRUPTIONS}


def test_every_volume_artefact_is_monotone_and_in_the_ssim_bands(severity_ssim):
    for name, scores in severity_ssim.items():
        assert all(a > b for a, b in itertools.pairwise(scores)), (name, scores)
        if get_corruption(name).calibration != "ssim-band":
            continue
        for s, score in zip(SEVERITIES, scores, strict=True):
            lo, hi = SSIM_BANDS[s]
            assert lo <= score <= hi, (name, s, score, SSIM_BANDS[s])


def test_mean_absolute_change_grows_with_severity_per_volume():
    """Each volume, not only the mean: a severity only scales that volume's artefact."""
    for name in VOLUME_CORRUPTIONS:
        for i, (v, sp) in enumerate(reference_volumes()[:3]):
            change = [np.abs(corrupt_volume(v, name, s, 0, i, sp) - v).mean() for s in SEVERITIES]
            assert all(a < b for a, b in itertools.pairwise(change)), (name, i, change)


def test_volume_artefacts_are_deterministic_and_keep_shape_and_range():
    v, sp = reference_volumes()[0]
    for name in VOLUME_CORRUPTIONS:
        a = corrupt_volume(v, name, 3, seed=1, position=4, spacing=sp)
        b = corrupt_volume(v, name, 3, seed=1, position=4, spacing=sp)
        np.testing.assert_array_equal(a, b)
        assert a.shape == v.shape and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
        other = corrupt_volume(v, name, 3, seed=2, position=4, spacing=sp)
        # beam hardening follows from the anatomy alone; every other artefact draws its own
        assert np.array_equal(a, other) == (name == "beam-hardening-3d"), name


def test_rician_noise_follows_its_closed_form():
    """On a zero signal the magnitude is Rayleigh: mean s*sqrt(pi/2); on a strong one it is
    about Gaussian around sqrt(A^2 + s^2) with std s."""
    s = get_corruption("rician-noise-3d").level(5)
    zero = corrupt_volume(np.zeros((32, 32, 32)), "rician-noise-3d", 5)
    np.testing.assert_allclose(zero.mean(), s * np.sqrt(np.pi / 2), rtol=0.02)
    bright = corrupt_volume(np.full((32, 32, 32), 0.8), "rician-noise-3d", 5)
    np.testing.assert_allclose(bright.mean(), np.sqrt(0.8**2 + s**2), rtol=0.01)
    np.testing.assert_allclose(bright.std(), s, rtol=0.05)


def test_ssim_of_identical_volumes_is_one_and_falls_with_noise():
    v = reference_volumes()[0][0]
    assert ssim_volumes([v], [v]) == pytest.approx(1.0)
    noisy = np.clip(v + np.random.default_rng(0).normal(0, 0.1, v.shape), 0, 1)
    assert ssim_volumes([v], [noisy]) < 0.9


def test_image_and_volume_corruptions_do_not_mix():
    vols = make_clinical_shift_3d(size=16, patients_per_site=5)
    with pytest.raises(
        ConfigError,
        match=r"'jpeg' is for 2D images, but 'clinical-shift-3d' holds volumes; .*ct-noise-3d",
    ):
        corrupted(vols, "jpeg", 2)
    imgs = make_clinical_shift(patients_per_site=5)
    with pytest.raises(ConfigError, match="'ring-3d' is for volumes"):
        corrupted(imgs, "ring-3d", 2)
    with pytest.raises(DataError, match="is for volumes"):
        corrupt(imgs.image(0), "ring-3d", 1)


def test_corruption_shift_on_volumes_tests_every_ct_artefact():
    ds = make_clinical_shift_3d(size=16, patients_per_site=5)
    split = apply_shift(ds, "corruption", severities=[1, 5])
    assert set(split.tests) == {"clean"} | {f"{n}@{s}" for n in CT_3D for s in (1, 5)}
    clean, worst = split.tests["clean"], split.tests["ring-3d@5"]
    assert worst.spacing.tolist() == clean.spacing.tolist()
    i = 1
    want = corrupt_volume(clean.volume(i), "ring-3d", 5, 0, int(clean.index[i]), clean.spacing[i])
    np.testing.assert_array_equal(worst.volume(i), want)
