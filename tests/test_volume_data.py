"""Volume datasets: views keep spacing, the built-in 3D data, MedMNIST 3D files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clinadapt.data import DATASETS, load_dataset
from clinadapt.data import medmnist as mm
from clinadapt.data.synthetic_3d import (
    FIELD_OF_VIEW_MM,
    VOLUME_SITES,
    _grid,
    acquire,
    make_clinical_shift_3d,
    make_clinical_shift_3d_seg,
)
from clinadapt.data.volume import (
    ArrayVolumeMasks,
    ArrayVolumes,
    VolumeDataset,
    VolumeSegmentationDataset,
    check_volume,
)
from clinadapt.errors import DataError
from clinadapt.shifts import apply_shift


def small(**kw):
    return make_clinical_shift_3d(size=16, patients_per_site=6, **kw)


def test_views_keep_spacing_and_volumes_are_unit_floats():
    vols = np.random.default_rng(0).random((4, 5, 6, 7)).astype(np.float32)
    ds = VolumeDataset(
        name="v",
        source=ArrayVolumes(vols),
        labels=np.array([0, 1, 0, 1]),
        class_names=["a", "b"],
        task="binary",
        spacing=np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4.0]]),
    )
    sub = ds.subset([3, 1])
    assert sub.spacing.tolist() == [[4, 4, 4], [2, 2, 2]] and sub.spatial_dims == 3
    np.testing.assert_array_equal(sub.volume(0), vols[3])
    assert ds.summary()["spacing_mm"] == ["1x1x1", "2x2x2", "3x3x3", "4x4x4"]
    u8 = VolumeDataset(
        name="u",
        source=ArrayVolumes(np.full((1, 2, 2, 2), 255, np.uint8)),
        labels=np.array([0]),
        class_names=["a"],
    )
    assert u8.volume(0).dtype == np.float32 and u8.volume(0).max() == 1.0
    assert u8.spacing_origin == "assumed 1 mm (unknown)"
    with pytest.raises(DataError, match=r"spacing must be \(N,3\)"):
        VolumeDataset(
            name="v",
            source=ArrayVolumes(vols),
            labels=np.zeros(4),
            class_names=["a"],
            spacing=[1, 1],
        )
    with pytest.raises(DataError, match="must be 3D"):
        check_volume(np.zeros((2, 3, 3, 3)), "x.nii")
    with pytest.raises(DataError, match="non-finite"):
        check_volume(np.full((2, 2, 2), np.nan, np.float32), "x.nii")


def test_segmentation_volumes_check_their_label_maps():
    vols = np.zeros((2, 4, 4, 4), np.float32)
    maps = np.zeros((2, 4, 4, 4), np.uint8)
    maps[0, :2] = 1
    with pytest.raises(DataError, match=r"label 3 is outside 0..2"):
        ArrayVolumeMasks(np.full((1, 2, 2, 2), 3), 2)
    ds = VolumeSegmentationDataset(
        name="s",
        source=ArrayVolumes(vols),
        labels=None,
        class_names=["organ"],
        masks=ArrayVolumeMasks(maps, 1),
        areas=np.array([[32], [0]]),
        spacing=[2.0, 2.0, 2.0],
    )
    assert ds.labels.tolist() == [[1], [0]] and ds.empty().tolist() == [False, True]
    np.testing.assert_allclose(ds.volumes_ml(), [[32 * 8 / 1000], [0]])
    with pytest.raises(DataError, match="background"):
        VolumeSegmentationDataset(
            name="s",
            source=ArrayVolumes(vols),
            labels=None,
            class_names=["background"],
            masks=ArrayVolumeMasks(maps, 1),
            areas=np.array([[32], [0]]),
        )


def test_builtin_volumes_are_deterministic_and_sites_differ():
    a, b = small(seed=0), small(seed=0)
    assert a.fingerprint() == b.fingerprint() and a.fingerprint() != small(seed=1).fingerprint()
    assert a.spacing[0].tolist() == [FIELD_OF_VIEW_MM / 16] * 3 and a.modality == "ct"
    assert set(a.domains) == set(VOLUME_SITES) and a.splits == ["test", "train", "val"]
    assert a.volume(0).shape == (16, 16, 16) and a.volume(0).dtype == np.float32
    # one patient per volume and no patient crosses a split
    pid = a.meta("patient_id")
    assert len(set(pid)) == len(a)
    # noise: on a uniform 40 HU phantom the output's spread is the site's noise in window units
    flat = np.full((16, 16, 16), 40.0, np.float32)
    grids = _grid(16)
    for site in ("site-a", "site-c"):
        out = acquire(np.random.default_rng(0), flat, VOLUME_SITES[site], grids)
        assert abs(out.std() - VOLUME_SITES[site].noise_hu / 400.0) < 0.002
    # thick slices: a sharp step along z spreads over the slice thickness at site-b only
    step = np.where(np.arange(16) < 8, 0.0, 200.0)[None, None, :] * np.ones((16, 16, 1), np.float32)
    for site, spread in (("site-a", 1), ("site-b", 3)):
        quiet = dataclasses.replace(VOLUME_SITES[site], noise_hu=0.0, gain=1.0, offset_hu=0.0)
        profile = acquire(np.random.default_rng(0), step, quiet, grids)[8, 8]
        assert (
            (profile > profile.min() + 0.01) & (profile < profile.max() - 0.01)
        ).sum() >= spread - 1
        if spread == 1:
            assert ((profile > 0.41) & (profile < 0.89)).sum() == 0


def test_builtin_segmentation_volumes_match_and_masks_fit():
    cls = small()
    seg = make_clinical_shift_3d_seg(size=16, patients_per_site=6)
    assert isinstance(seg, VolumeSegmentationDataset) and seg.class_names == ["organ", "lesion"]
    np.testing.assert_array_equal(seg.volume(5), cls.volume(5))
    # a volume classified "lesion" has lesion voxels in its label map, a normal one has none
    has = seg.areas[:, 1] > 0
    np.testing.assert_array_equal(has, cls.labels == 1)
    for i in range(len(seg)):
        np.testing.assert_array_equal(
            np.bincount(seg.mask(i).ravel(), minlength=3)[1:], seg.areas[i]
        )
    one = make_clinical_shift_3d_seg(size=16, patients_per_site=6, classes=["lesion"])
    assert one.class_names == ["lesion"] and one.areas[:, 0].tolist() == seg.areas[:, 1].tolist()
    with pytest.raises(DataError, match="classes must be drawn from"):
        make_clinical_shift_3d_seg(size=16, classes=["kidney"])


def test_builtin_volumes_are_registered_and_split_by_the_domain_shift():
    ds = load_dataset("clinical-shift-3d", size=16, patients_per_site=6)
    assert "3d" in DATASETS.entry("clinical-shift-3d").tags
    split = apply_shift(ds, "domain", source="site-a")
    assert isinstance(split.train, VolumeDataset) and set(split.tests) == set(VOLUME_SITES)
    assert split.val is not None and len(split.train.spacing) == len(split.train)


def make_npz_3d(path, flag, size=28, counts=(5, 2, 3), seed=0):
    info = mm.INFO[flag]
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % len(info.class_names)).astype(np.uint8)[:, None]
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.mark.parametrize("flag", mm.FLAGS_3D)
def test_every_medmnist_3d_flag_reads_its_official_layout(tmp_path, flag):
    info = mm.INFO[flag]
    arrays = make_npz_3d(tmp_path / f"{flag}.npz", flag)
    ds = mm.load_medmnist_npz(tmp_path / f"{flag}.npz")
    assert isinstance(ds, VolumeDataset) and len(ds) == 10 and ds.modality == info.modality
    np.testing.assert_allclose(ds.volume(6), arrays["val_images"][1] / 255.0, atol=1e-7)
    assert ds.split("test").labels.tolist() == (np.arange(3) % len(info.class_names)).tolist()
    assert set(info.md5) == {28, 64} and "3D" in DATASETS.entry(flag).help
    if info.spacing_mm and 28 in info.spacing_mm:
        assert ds.spacing[0].tolist() == [info.spacing_mm[28]] * 3
    else:
        assert ds.spacing_origin == "assumed 1 mm (unknown)" and ds.notes


def test_medmnist_3d_sizes_and_shapes(tmp_path):
    make_npz_3d(tmp_path / "fracturemnist3d_64.npz", "fracturemnist3d", size=64, counts=(1, 1, 1))
    ds = load_dataset(tmp_path / "fracturemnist3d_64.npz")
    assert ds.name == "fracturemnist3d_64" and ds.volume(0).shape == (64, 64, 64)
    assert ds.spacing[0].tolist() == [1.0, 1.0, 1.0]  # a 64 mm cube at 64^3
    with pytest.raises(DataError, match=r"unsupported MedMNIST 3D size 128"):
        mm.load_medmnist("organmnist3d", size=128, root=tmp_path)
    flat = tmp_path / "nodulemnist3d.npz"
    np.savez(
        flat,
        **{f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in ("train", "val", "test")},
        **{f"{s}_labels": np.zeros((2, 1), np.uint8) for s in ("train", "val", "test")},
    )
    with pytest.raises(
        DataError, match=r"train_images have shape \(2, 28, 28\).*\(N,S,S,S\) volumes"
    ):
        mm.load_medmnist_npz(flat)
