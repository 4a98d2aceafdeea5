"""Medical-image augmentations: geometry, intensity, stain jitter and modality policies."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from clinadapt.errors import ConfigError
from clinadapt.ssl.augment import (
    RGB_FROM_HED,
    Augmenter,
    colour_jitter,
    gaussian_blur,
    gaussian_noise,
    grey_intensity,
    hed_to_rgb,
    policy_for_modality,
    random_flips,
    random_grayscale,
    random_resized_crop,
    rgb_to_hed,
    stain_jitter,
)
from clinadapt.ssl.draws import ImageDraws


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def per_image(x, seed=0):
    """One generator per image of ``x``."""
    return ImageDraws.seeded(seed, len(x))


def test_policies_follow_modality():
    xray = policy_for_modality("xray")
    assert xray.kind == "grey" and xray.hflip == 0.0  # laterality matters
    assert xray.saturation == 0.4 and xray.grayscale_p == 0.0
    assert policy_for_modality("CT").kind == "grey"
    assert policy_for_modality("ultrasound").hflip == 0.5
    path = policy_for_modality("pathology")
    assert path.kind == "stain" and path.vflip == 0.5 and path.rot90
    assert policy_for_modality("dermoscopy").kind == "colour"
    assert policy_for_modality("unknown").kind == "colour"
    mae = path.geometric_only()
    assert mae.stain_sigma == 0 and mae.blur_p == 0 and mae.rot90


def test_random_resized_crop_geometry():
    # a ramp whose value is the pixel-centre x (or y) coordinate: bilinear sampling is exact on
    # it, so each crop's first/last output columns reveal the crop box
    h = w = 64
    size = 8
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    img = torch.stack([xs.view(1, -1).expand(h, w), xs.view(-1, 1).expand(h, w)])
    batch = img.unsqueeze(0).repeat(50, 1, 1, 1)
    lo, hi = 0.25, 0.9
    out = random_resized_crop(batch, size, (lo, hi), per_image(batch, 3))
    assert out.shape == (50, 2, size, size)
    for o in out:
        x_first, x_last = o[0, 0, 0].item(), o[0, 0, -1].item()
        y_first, y_last = o[1, 0, 0].item(), o[1, -1, 0].item()
        bw, bh = (x_last - x_first) / (size - 1), (y_last - y_first) / (size - 1)
        x0, y0 = x_first - bw / 2, y_first - bh / 2
        cw, ch = bw * size, bh * size
        assert x0 >= -1e-6 and x0 + cw <= w + 1e-6 and y0 >= -1e-6 and y0 + ch <= h + 1e-6
        area = cw * ch / (h * w)
        # the aspect clamp to the image can only shrink the area below the drawn fraction
        assert area <= hi + 1e-6 and area >= lo * 0.74
        assert 3 / 4 - 1e-6 <= cw / ch <= 4 / 3 + 1e-6 or min(cw, ch) >= 63.9
    with pytest.raises(ConfigError, match="crop scale"):
        random_resized_crop(batch, size, (0.0, 0.5), per_image(batch))


def test_flips_and_rotations():
    x = torch.rand(6, 1, 5, 5, generator=gen())
    assert torch.equal(random_flips(x, 1.0, 0.0, False, per_image(x)), x.flip(-1))
    assert torch.equal(random_flips(x, 0.0, 1.0, False, per_image(x)), x.flip(-2))
    assert torch.equal(random_flips(x, 0.0, 0.0, False, per_image(x)), x)
    r = random_flips(x, 0.0, 0.0, True, per_image(x, 1))
    for a, b in zip(r, x, strict=True):
        assert any(torch.equal(a, torch.rot90(b, k, dims=(-2, -1))) for k in range(4))


def test_grey_intensity_formulas():
    x = torch.rand(4, 3, 6, 6, generator=gen())
    assert torch.allclose(grey_intensity(x, 0.0, 0.4, 0.4, (0.7, 1.5), per_image(x)), x, atol=1e-6)
    # no brightness/contrast change and a fixed gamma: exactly x ** gamma
    y = grey_intensity(x, 1.0, 0.0, 0.0, (2.0, 2.0), per_image(x))
    assert torch.allclose(y, x**2, atol=1e-6)
    # channels of a grey image stay equal (no colour is introduced)
    g = x[:, :1].expand(-1, 3, -1, -1)
    z = grey_intensity(g, 1.0, 0.4, 0.4, (0.7, 1.5), per_image(g))
    assert torch.equal(z[:, 0], z[:, 1]) and torch.equal(z[:, 1], z[:, 2])
    assert z.min() >= 0 and z.max() <= 1


def test_colour_jitter_and_grayscale():
    x = torch.rand(4, 3, 6, 6, generator=gen())
    assert torch.allclose(colour_jitter(x, 1.0, 0.0, 0.0, 0.0, per_image(x)), x)
    grey = random_grayscale(x, 1.0, per_image(x))
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(grey[:, c], lum, atol=1e-6)
    y = colour_jitter(x, 1.0, 0.4, 0.4, 0.4, per_image(x))
    assert y.shape == x.shape and not torch.allclose(y, x) and y.min() >= 0 and y.max() <= 1


def test_hed_round_trip_and_pure_stain():
    x = torch.rand(2, 3, 4, 4, generator=gen(), dtype=torch.float64) * 0.9 + 0.05
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-9)
    # a pixel stained by haematoxylin alone: I = exp(-c * od_H) (Beer-Lambert), skimage units
    od_h = RGB_FROM_HED[0]
    c = 0.05
    pixel = torch.exp(-c * od_h * -np.log(1e-6)).view(1, 3, 1, 1)
    hed = rgb_to_hed(pixel).view(3)
    assert hed.tolist() == pytest.approx([c, 0.0, 0.0], abs=1e-9)
    assert torch.allclose(stain_jitter(x, 0.0, per_image(x)), x)
    y = stain_jitter(x.float(), 0.05, per_image(x.float()))
    assert y.shape == x.shape and 0 < (y - x.float()).abs().max() < 0.5


def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 1, 20, 20, generator=gen(), dtype=torch.float64)
    y = gaussian_blur(x, 1.0, (1.0, 1.0), per_image(x))
    for a, b in zip(x, y, strict=True):
        ref = gaussian_filter(a[0].numpy(), 1.0, mode="mirror", truncate=3.0)
        assert np.allclose(b[0].numpy(), ref, atol=1e-6)
    assert torch.equal(gaussian_blur(x, 0.0, (1.0, 2.0), per_image(x)), x)


def test_gaussian_noise():
    x = torch.full((3, 1, 16, 16), 0.5)
    assert torch.equal(gaussian_noise(x, 0.0, 0.1, per_image(x)), x)
    y = gaussian_noise(x, 1.0, 0.1, per_image(x))
    assert 0 < (y - x).std() < 0.1


def test_augmenter_view_is_seeded_and_normalised():
    aug = Augmenter(policy_for_modality("xray"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.rand(5, 3, 64, 64, generator=gen())
    a = aug.view(x, 32, (0.3, 1.0), per_image(x, 7))
    b = aug.view(x, 32, (0.3, 1.0), per_image(x, 7))
    c = aug.view(x, 32, (0.3, 1.0), per_image(x, 8))
    assert a.shape == (5, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # normalised from [0,1]: values lie in [(0-0.5)/0.25, (1-0.5)/0.25]
    assert a.min() >= -2 - 1e-5 and a.max() <= 2 + 1e-5
    # a grey (1-channel) model with RGB statistics uses their mean
    grey = Augmenter(policy_for_modality("xray"), (0.2, 0.4, 0.6), (0.5, 0.5, 0.5))
    assert torch.allclose(grey.normalise(torch.full((1, 1, 2, 2), 0.4)), torch.zeros(1, 1, 2, 2))
