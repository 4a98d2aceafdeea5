"""Preprocessing in two stages (uint8 on the host, float on the device) gives the one-step
preprocessing's tensors, on the device the model runs on, on every path that feeds a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from clinadapt.data import load_dataset
from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.data.loading import batch_chunks, iter_batches, preprocess_on, stages
from clinadapt.errors import DataError
from clinadapt.methods import Context
from clinadapt.models import MODELS
from clinadapt.models.base import LUMA_WEIGHTS, Preprocessing
from clinadapt.models.stages import HostBatch, constant

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# the published normalisations of the families (timm/torchvision ImageNet for ResNet, ViT, Swin,
# DINO(v2), MAE and SAM; OpenAI CLIP's, which BiomedCLIP reuses; [-1, 1] of the tiny models and
# the Inception-style timm ViTs), bilinear and bicubic, 3- and 1-channel; plus every catalogue
# entry that fixes its preprocessing
PUBLISHED = [
    Preprocessing((224, 224), *IMAGENET, 3, "bilinear"),
    Preprocessing((224, 224), *IMAGENET, 3, "bicubic"),
    Preprocessing((224, 224), *OPENAI_CLIP, 3, "bicubic"),
    Preprocessing((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 3, "bicubic"),
    Preprocessing((28, 28), (0.5,), (0.5,), 1, "bilinear"),
    Preprocessing((30, 26), *IMAGENET, 1, "bilinear"),  # per-channel stats for a grey model
]
CATALOGUE = [MODELS.get(n).preprocess for n in MODELS.names() if MODELS.get(n).preprocess]


def reference(pp: Preprocessing, image: np.ndarray) -> torch.Tensor:
    """One image as the documented rule says, written independently with torchvision: [0,1],
    alpha dropped, BT.601 luma for a grey model, antialiased resize (clamped to [0,1]), grey
    replicated for an RGB model, mean/std normalisation (a mean of the stats for fewer
    channels)."""
    x = torch.from_numpy(np.array(image, dtype=np.float64) / 255.0)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    x = x[:3] if x.shape[0] == 4 and pp.in_chans != 4 else x
    if x.shape[0] == 3 and pp.in_chans == 1:
        x = sum(w * x[c] for c, w in enumerate(LUMA_WEIGHTS))[None]
    if tuple(x.shape[-2:]) != pp.image_size:
        mode = TF.InterpolationMode(pp.interpolation)
        x = TF.resize(x.float()[None], list(pp.image_size), mode, antialias=True)[0]
        x = x.clamp(0, 1).double()
    if x.shape[0] == 1 and pp.in_chans == 3:
        x = x.expand(3, -1, -1)
    mean, std = (
        torch.tensor(pp.mean, dtype=torch.float64),
        torch.tensor(pp.std, dtype=torch.float64),
    )
    if len(mean) != x.shape[0]:
        mean, std = mean.mean().expand(x.shape[0]), std.mean().expand(x.shape[0])
    return TF.normalize(x, mean.tolist(), std.tolist()).float()


def images(kind: str, shape: tuple[int, int], n: int, seed: int = 0) -> list[np.ndarray]:
    channels = {"grey": (), "rgb": (3,), "rgba": (4,), "grey1": (1,)}[kind]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, *channels), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("pp", PUBLISHED + CATALOGUE, ids=lambda p: repr(p)[14:60])
@pytest.mark.parametrize("kind", ["grey", "grey1", "rgb", "rgba"])
def test_two_stages_give_the_one_step_preprocessing(pp, kind):
    for shape in [pp.image_size, (40, 48), (17, 20)]:  # native, larger, smaller
        imgs = images(kind, shape, 3)
        one_step = pp(imgs)
        batch = pp.host_stage(imgs)
        assert all(p.dtype == torch.uint8 for p in batch.parts)
        two = pp.device_stage(batch, "cpu")
        assert torch.equal(two, one_step)  # bit for bit on the CPU
        assert two.shape == (3, pp.in_chans, *pp.image_size) and two.dtype == torch.float32
        want = torch.stack([reference(pp, im) for im in imgs])
        torch.testing.assert_close(two, want, rtol=0, atol=1e-5)
        # the same from a (N,H,W[,C]) array or tensor as from a list
        assert torch.equal(pp.device_stage(pp.host_stage(np.stack(imgs))), one_step)
        assert torch.equal(pp(torch.from_numpy(np.stack(imgs))), one_step)


def test_at_the_model_size_the_values_match_the_formula_exactly():
    # no resize: (x/255 - mean)/std in float32, which the reference computes in float64
    pp = Preprocessing((8, 8), *IMAGENET, 3)
    imgs = images("rgb", (8, 8), 4)
    want = torch.stack([reference(pp, im) for im in imgs])
    torch.testing.assert_close(pp.device_stage(pp.host_stage(imgs)), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_a_batch_of_mixed_sizes_is_each_image_alone(in_chans):
    pp = Preprocessing((24, 24), *IMAGENET, in_chans)
    imgs = images("rgb", (40, 48), 2) + images("rgb", (24, 24), 1) + images("rgb", (33, 30), 2)
    order = [0, 2, 3, 1, 4]  # sizes interleaved
    imgs = [imgs[i] for i in order]
    batch = pp.host_stage(imgs)
    assert len(batch.parts) == 3 and len(batch) == 5  # one uint8 stack per size
    got = pp.device_stage(batch, "cpu")
    assert torch.equal(got, pp(imgs))
    assert torch.equal(got, torch.cat([pp([im]) for im in imgs]))


def test_the_host_stage_moves_uint8_at_the_native_size():
    pp = Preprocessing((224, 224), *IMAGENET, 3)
    grey, rgba = images("grey", (256, 256), 4), images("rgba", (256, 256), 4)
    assert pp.host_stage(grey).nbytes == 4 * 256 * 256  # one byte per pixel, not 3x4
    assert pp.host_stage(grey).parts[0].shape == (4, 256, 256, 1)
    assert pp.host_stage(rgba).parts[0].shape == (4, 256, 256, 3)  # alpha dropped on the host
    assert pp(grey).numel() * 4 == 12 * 224 * 224 * 4  # what the float path moves
    source = np.stack(grey)
    source.flags.writeable = False  # cached datasets hand out read-only arrays
    assert torch.equal(pp.device_stage(pp.host_stage(source)), pp(grey))


def test_bad_input_fails_on_the_host_naming_the_problem():
    pp = Preprocessing((8, 8), *IMAGENET, 3)
    with pytest.raises(DataError, match="2 channels but the model takes 3"):
        pp.host_stage([np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(DataError, match="uint8 or float"):
        pp.host_stage(np.zeros((1, 8, 8), np.int32))
    with pytest.raises(DataError, match=r"\(N,H,W\) or \(N,H,W,C\)"):
        pp.host_stage(np.zeros((8,), np.uint8))
    with pytest.raises(DataError, match="empty"):
        pp.host_stage([])


def test_the_device_stage_does_all_its_work_on_the_device():
    # the meta device computes shapes only and refuses to mix with CPU tensors: every float op
    # of the device stage (scaling, channels, resize, mean/std) must run there
    for pp in (Preprocessing((24, 24), *IMAGENET, 3), Preprocessing((24, 24), *IMAGENET, 1)):
        for kind in ("grey", "rgb", "rgba"):
            mixed = images(kind, (40, 48), 2) + images(kind, (24, 24), 1)
            for imgs in (mixed[:2], mixed):
                x = pp.device_stage(pp.host_stage(imgs), "meta")
                assert x.device.type == "meta" and x.shape == (len(imgs), pp.in_chans, 24, 24)
                assert x.dtype == torch.float32


def grey_folder(root, n=10):
    rng = np.random.default_rng(1)
    for i in range(n):
        shape = (40, 48) if i % 3 else (33, 30)  # some batches of mixed sizes
        (root / ("a", "b")[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            root / ("a", "b")[i % 2] / f"{i}.png"
        )
    return load_dataset(root)


def test_batches_on_a_device_are_the_host_batches_workers_or_not(tmp_path):
    ds = grey_folder(tmp_path / "pngs")
    pp = Preprocessing((24, 24), *IMAGENET, 3)
    host = [x for x, _, _ in ds.batches(pp, 4, workers=0)]
    for workers in (0, 2):
        for device in ("cpu", torch.device("cpu")):
            got = list(ds.batches(pp, 4, workers=workers, device=device))
            assert len(got) == len(host)
            for (x, _, _), want in zip(got, host, strict=True):
                assert x.device.type == "cpu" and torch.equal(x, want)
    metas = [x for x, _, _ in ds.batches(pp, 4, workers=2, device="meta")]
    assert [x.device.type for x in metas] == ["meta"] * len(host)
    assert [x.shape for x in metas] == [x.shape for x in host]


def test_workers_send_uint8_batches_when_a_device_is_given():
    pp = Preprocessing((24, 24), *IMAGENET, 3)
    host, finish = stages(pp, "cpu")
    item = host(images("grey", (40, 48), 2))
    assert isinstance(item, HostBatch) and item.parts[0].dtype == torch.uint8
    assert finish(item).shape == (2, 3, 24, 24)
    # without a device, or for a one-stage callable (volumes), the host preprocesses fully
    host, finish = stages(pp, None)
    assert host(images("grey", (40, 48), 2)).dtype == torch.float32
    host, finish = stages(lambda imgs: torch.zeros(len(imgs), 2), "meta")
    assert finish(host(images("grey", (4, 4), 3))).device.type == "meta"
    views = images("rgb", (30, 30), 3)  # test-time views of one image (TPT)
    assert torch.equal(preprocess_on(pp, views, "cpu"), pp(views))
    assert preprocess_on(pp, views, "meta").device.type == "meta"


def test_context_batches_preprocess_on_the_context_device():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (6, 20, 20), dtype=np.uint8)
    ds = ClinicalDataset("mem", ArraySource(arr), np.arange(6) % 2, ["a", "b"])
    pp = Preprocessing((16, 16), *IMAGENET, 3)
    for x, _, pos in Context(batch_size=4, device="meta").batches(ds, pp):
        assert x.device.type == "meta" and x.shape == (len(pos), 3, 16, 16)
    got = torch.cat([x for x, _, _ in Context(batch_size=4).batches(ds, pp)])
    want = torch.stack([reference(pp, im) for im in arr])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_iter_batches_yields_what_the_one_step_path_yields_for_every_chunking():
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (7, 12, 12, 3), dtype=np.uint8)
    ds = ClinicalDataset("mem", ArraySource(arr), np.arange(7) % 2, ["a", "b"])
    pp = Preprocessing((10, 10), *OPENAI_CLIP, 1, "bicubic")
    chunks = batch_chunks(len(ds), 3, shuffle=True, seed=5)
    old = list(iter_batches(ds, pp, chunks, 0))
    new = list(iter_batches(ds, pp, chunks, 0, device="cpu"))
    for (xa, ya, pa), (xb, yb, pb) in zip(old, new, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        np.testing.assert_array_equal(pa, pb)
    assert torch.equal(torch.cat([x for x, _, _ in old]), pp(list(arr[np.concatenate(chunks)])))


def test_the_resize_antialiases():
    # an independent check of the resize itself: a 2x downscale of a checkerboard averages it
    # (away from the corners, where the filter is cut)
    board = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    pp = Preprocessing((16, 16), (0.0,), (1.0,), 1)
    x = pp.device_stage(pp.host_stage([board]), "cpu")[0, 0]
    inner = x[1:-1].flatten().tolist() + x[:, 1:-1].flatten().tolist()
    np.testing.assert_allclose(inner, 0.5, rtol=0, atol=1e-6)
    plain = F.interpolate(torch.from_numpy(board)[None, None].float() / 255, size=(16, 16))
    assert not torch.allclose(plain, x)  # without antialiasing it would alias


def test_frozen_features_for_ssl_evaluation_are_those_of_the_one_step_preprocessing():
    from clinadapt.models import load_model
    from clinadapt.ssl.evaluate import embed

    model = load_model("tiny-resnet").eval()
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (5, 70, 70), dtype=np.uint8)
    ds = ClinicalDataset("mem", ArraySource(arr), np.arange(5) % 2, ["a", "b"])
    with torch.no_grad():
        want = model.encode_image(model.preprocess(list(arr))).numpy()
    np.testing.assert_allclose(embed(model, ds, batch_size=2), want, rtol=0, atol=1e-5)


def test_normalisation_constants_are_made_once_per_device():
    cpu = torch.device("cpu")
    a = constant(IMAGENET[0], cpu)
    assert a is constant(IMAGENET[0], cpu)  # no new tensor (no copy to a GPU) per batch
    assert a.dtype == torch.float32 and a.tolist() == torch.tensor(IMAGENET[0]).tolist()
    assert constant(IMAGENET[0], torch.device("meta")).device.type == "meta"
    wide = constant(LUMA_WEIGHTS, cpu, torch.float64)
    assert wide.dtype == torch.float64 and wide.tolist() == list(LUMA_WEIGHTS)
    pp = Preprocessing((8, 8), *IMAGENET, 3)
    pp(images("grey", (8, 8), 1))
    assert torch.equal(constant(IMAGENET[0], cpu), torch.tensor(IMAGENET[0]))  # left unchanged
