"""Each corruption degrades a built-in image more at every higher severity, reproducibly."""

import itertools

import numpy as np
import pytest

from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts.corruptions import (
    CORRUPTIONS,
    CorruptedSource,
    corrupt,
    corrupted,
    corruptions_for,
    get_corruption,
)
from clinadapt.shifts.corruptions.calibration import (
    MEDMNIST_C_XRAY,
    SSIM_BANDS,
    SSIM_MEDIANS,
    ssim_by_severity,
)
from clinadapt.shifts.corruptions.calibration import ssim as calibration_ssim
from clinadapt.shifts.corruptions.histology import hed_to_rgb, rgb_to_hed

# the image artefacts (volume artefacts, tagged 3d, are tested in test_volume_corruptions.py)
IMAGE_CORRUPTIONS = [n for n in sorted(CORRUPTIONS) if "3d" not in CORRUPTIONS.entry(n).tags]


@pytest.fixture(scope="module")
def images(small_shift):
    grey = small_shift.image(0)
    # An H&E-like colour version of the same image: pink background, purple dense tissue.
    t = grey.astype(np.float64)[..., None] / 255.0
    rgb = (1 - t) * np.array([0.35, 0.15, 0.45]) + t * np.array([0.95, 0.75, 0.85])
    return {"grey": grey, "rgb": (rgb * 255).astype(np.uint8)}


# MedMNIST-C's published levels for the same modality (Di Salvo et al. 2024, registry.py of
# github.com/francescodisalvo05/medmnistc-api): chestmnist/pneumoniamnist contrast_down,
# gamma_corr_up, brightness_down/up, jpeg_compression, chestmnist gaussian_noise, gaussian_blur
# kernels 3-11 as torchvision sigmas, organamnist gaussian_noise, breastmnist speckle_noise.
MEDMNIST_C = {
    "contrast": (0.9, 0.8, 0.7, 0.6, 0.4),
    "gamma": (1.1, 1.2, 1.3, 1.4, 1.6),
    "underexposure": (0.9, 0.8, 0.7, 0.6, 0.5),
    "overexposure": (1.1, 1.2, 1.3, 1.4, 1.5),
    "jpeg": (50, 30, 15, 10, 7),
    "gaussian-noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "blur": tuple(0.3 * ((k - 1) / 2 - 1) + 0.8 for k in (3, 5, 7, 9, 11)),
    "ct-noise": (0.04, 0.08, 0.12, 0.16, 0.20),
    "speckle": (0.10, 0.15, 0.20, 0.25, 0.30),
}


@pytest.fixture(scope="module")
def severity_ssim():
    return {name: ssim_by_severity(name) for name in IMAGE_CORRUPTIONS}


def test_levels_are_medmnist_c_or_in_the_ssim_bands(severity_ssim):
    for name, scores in severity_ssim.items():
        c = CORRUPTIONS.get(name)
        assert all(a > b for a, b in itertools.pairwise(scores)), (name, scores)
        if name in MEDMNIST_C:
            assert c.calibration.startswith("MedMNIST-C"), name
            np.testing.assert_allclose(c.levels, MEDMNIST_C[name], err_msg=name)
        else:
            assert c.calibration == "ssim-band", name
            for s, score in enumerate(scores, start=1):
                lo, hi = SSIM_BANDS[s]
                assert lo <= score <= hi, (name, s, score, SSIM_BANDS[s])
    # the bands are centred on the median SSIM of MedMNIST-C's X-ray levels, as stated
    medians = np.median([severity_ssim[n] for n in MEDMNIST_C_XRAY], axis=0)
    np.testing.assert_allclose(medians, SSIM_MEDIANS, atol=0.005)
    # severity 1 is mild: contrast 0.4 used to send a chest X-ray model to chance
    assert severity_ssim["contrast"][0] > 0.98 and severity_ssim["underexposure"][0] > 0.95


def test_ssim_matches_a_hand_computation(images):
    """MONAI's SSIM, as used for the bands, against the definition (Wang et al. 2004)."""
    from scipy.ndimage import gaussian_filter

    a = images["grey"].astype(np.float64) / 255
    b = corrupt(images["grey"], "gaussian-noise", 2, seed=0).astype(np.float64) / 255

    def f(x):  # MONAI: an 11-tap Gaussian window, sigma 1.5, valid region only
        return gaussian_filter(x, 1.5, truncate=5 / 1.5)[5:-5, 5:-5]

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    ref = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    got = calibration_ssim([images["grey"]], [(b * 255 + 0.5).astype(np.uint8)])
    assert got == pytest.approx(ref.mean(), abs=2e-3)


@pytest.mark.parametrize("name", IMAGE_CORRUPTIONS)
def test_corruption_is_deterministic_and_keeps_shape(name, images):
    img = images["grey"]
    a = corrupt(img, name, 3, seed=1, position=7)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, corrupt(img, name, 3, seed=1, position=7))
    assert corrupt(images["rgb"], name, 3).shape == images["rgb"].shape


def test_random_corruptions_depend_on_position_and_seed(images):
    img = images["grey"]
    base = corrupt(img, "gaussian-noise", 2, seed=0, position=0)
    assert not np.array_equal(base, corrupt(img, "gaussian-noise", 2, seed=0, position=1))
    assert not np.array_equal(base, corrupt(img, "gaussian-noise", 2, seed=1, position=0))


def test_corrupted_view_is_order_independent_and_fingerprinted(small_shift):
    test = small_shift.split("test")
    view = corrupted(test, "jpeg", 4, seed=0)
    assert view.image(3).shape == test.image(3).shape
    # the same source image gets the same corruption whatever view or order reaches it
    rev = corrupted(test.subset(np.arange(len(test))[::-1]), "jpeg", 4, seed=0)
    assert np.array_equal(rev.image(len(test) - 1 - 3), view.image(3))
    fps = {
        corrupted(test, n, s, seed).fingerprint()
        for n, s, seed in [("jpeg", 4, 0), ("jpeg", 3, 0), ("blur", 4, 0), ("jpeg", 4, 1)]
    }
    assert len(fps) == 4 and test.fingerprint() not in fps
    assert "jpeg at severity 4" in view.describe(0)
    assert np.array_equal(view.labels, test.labels)


def test_registry_by_modality_and_errors():
    assert set(corruptions_for("xray")) == {
        "contrast",
        "gamma",
        "gaussian-noise",
        "blur",
        "jpeg",
        "underexposure",
        "overexposure",
    }
    assert set(corruptions_for("ct")) == {"ct-noise", "streak", "ring", "windowing"}
    assert set(corruptions_for("mri")) == {"bias-field", "ghosting", "motion", "rician-noise"}
    assert set(corruptions_for("dermoscopy")) == {"lighting", "colour-cast", "hair", "blur"}
    assert set(corruptions_for("pathology")) == {"stain", "jpeg", "blur", "bubbles"}
    assert {"speckle", "vignetting"} <= set(corruptions_for("ultrasound"))
    assert "vignetting" in corruptions_for("fundus")
    with pytest.raises(ConfigError, match="modality 'unknown'"):
        corruptions_for("unknown")
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        get_corruption("fog")
    with pytest.raises(ConfigError, match="severity must be one of"):
        corrupt(np.zeros((8, 8), np.uint8), "blur", 6)
    with pytest.raises(ConfigError, match="severity"):
        CorruptedSource(ArraySource(np.zeros((2, 8, 8), np.uint8)), "blur", 0)
    with pytest.raises(DataError, match="uint8"):
        corrupt(np.zeros((8, 8), np.float32), "blur", 1)


def test_hed_round_trip_and_pure_stains():
    rgb = np.random.default_rng(0).uniform(0.1, 1.0, (6, 6, 3))
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(rgb)), rgb, atol=1e-9)
    # one unit of pure haematoxylin has the optical densities of its stain vector
    od = -np.log(hed_to_rgb(np.array([1.0, 0.0, 0.0])))
    np.testing.assert_allclose(od, [0.65, 0.70, 0.29])


def test_contrast_and_windowing_by_hand():
    img = np.array([[0, 255], [255, 0]], np.uint8)
    # contrast level 0.9 around the mean 0.5: 0.5 +- 0.45 -> 0.05 and 0.95
    np.testing.assert_array_equal(corrupt(img, "contrast", 1), [[13, 242], [242, 13]])
    ds = ClinicalDataset("t", ArraySource(np.stack([img] * 2)), np.array([0, 1]), ["a", "b"])
    assert corrupted(ds, "windowing", 1).image(0).shape == (2, 2)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_xray_levels_do_what_medmnist_c_operations_do(images, severity):
    """The same images as PIL's enhancers and torchvision's gamma give (MedMNIST-C's ops)."""
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageEnhance

    grey = images["grey"]
    pil = Image.fromarray(grey)
    for name, op in (
        ("contrast", ImageEnhance.Contrast),
        ("overexposure", ImageEnhance.Brightness),
    ):
        ref = np.asarray(op(pil).enhance(MEDMNIST_C[name][severity - 1])).astype(int)
        # PIL blends with its integer mean grey and truncates; off by at most 2 grey levels
        assert np.abs(corrupt(grey, name, severity).astype(int) - ref).max() <= 2, name
    ref = np.asarray(TF.adjust_gamma(pil, MEDMNIST_C["gamma"][severity - 1], gain=1)).astype(int)
    assert np.abs(corrupt(grey, "gamma", severity).astype(int) - ref).max() <= 1
