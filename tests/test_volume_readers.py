"""Volume readers: NIfTI and DICOM series into RAS+ float volumes, label volumes, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from clinadapt.data import load_dataset
from clinadapt.data.volume import VolumeDataset, VolumeSegmentationDataset
from clinadapt.data.volume_io import VolumeSettings, load_volume_dataset, read_raw, read_volume
from clinadapt.errors import DataError
from filewriters import write_csv, write_dicom_series

# An LPS-like affine with permuted axes: file axis 0 runs along world y (posterior), axis 1
# along world x (left), axis 2 along z; voxel sizes 0.8, 0.7 and 2.5 mm.
PERMUTED = np.array(
    [[0.0, -0.7, 0.0, 30.0], [-0.8, 0.0, 0.0, 20.0], [0.0, 0.0, 2.5, -10.0], [0, 0, 0, 1.0]]
)


def write_nifti(path, data, affine=PERMUTED):
    """A NIfTI file; ``affine=None`` writes no orientation (qform and sform codes 0)."""
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def ramp(shape=(6, 5, 4)):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_nifti_is_put_in_ras_orientation_with_spacing_in_ras_order(tmp_path):
    data = ramp()
    path = write_nifti(tmp_path / "v.nii.gz", data)
    vol = read_volume(path, VolumeSettings(window="minmax"))
    canon = nib.as_closest_canonical(nib.load(str(path)))  # nibabel's own reorientation
    want = np.asarray(canon.dataobj, dtype=np.float32)
    want = (want - want.min()) / (want.max() - want.min())
    np.testing.assert_allclose(vol.array, want, atol=1e-6)
    assert vol.array.shape == (5, 6, 4)  # world x first: the file's axis 1
    np.testing.assert_allclose(vol.spacing, canon.header.get_zooms()[:3])
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5))
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")


def test_resampling_to_a_target_spacing_changes_the_grid_by_the_ratio(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", ramp((9, 11, 9)))
    vol = read_volume(path, VolumeSettings(spacing=(1.4, 1.6, 5.0), window="minmax"))
    # the extent between the first and last voxel centres is kept: x 10 x 0.7 mm = 5 x 1.4,
    # y 8 x 0.8 = 4 x 1.6, z 8 x 2.5 = 4 x 5.0
    assert vol.array.shape == (6, 5, 5)
    np.testing.assert_allclose(vol.spacing, (1.4, 1.6, 5.0))
    assert vol.native_shape == (9, 11, 9)


def test_ct_window_and_mri_percentiles_map_onto_unit_range(tmp_path):
    hu = np.full((8, 8, 8), 40.0, np.float32)
    hu[0] = -1000.0
    hu[1] = 1000.0
    path = write_nifti(tmp_path / "ct.nii.gz", hu, np.diag([1.0, 1.0, 1.0, 1.0]))
    v = read_volume(path, VolumeSettings(window="abdomen")).array  # level 40, width 400
    assert v[0].max() == 0.0 and v[1].min() == 1.0
    np.testing.assert_allclose(v[2:], 0.5)
    rng = np.random.default_rng(0)
    mri = rng.gamma(2.0, 100.0, (10, 10, 10)).astype(np.float32)
    path = write_nifti(tmp_path / "mr.nii.gz", mri, np.eye(4))
    got = read_volume(path, VolumeSettings(window="percentile")).array
    lo, hi = np.percentile(mri, (0.5, 99.5))
    np.testing.assert_allclose(got, np.clip((mri - lo) / (hi - lo), 0, 1), atol=1e-5)
    with pytest.raises(DataError, match="unknown window 'kidney'"):
        read_volume(path, VolumeSettings(window="kidney"))


def test_nifti_without_orientation_is_refused_naming_the_file(tmp_path):
    path = write_nifti(tmp_path / "noaff.nii.gz", ramp(), affine=None)
    assert int(nib.load(str(path)).header["sform_code"]) == 0
    with pytest.raises(DataError, match=r"noaff\.nii\.gz: the NIfTI header has no orientation"):
        read_volume(path)


def test_4d_volume_needs_volume_k_and_reads_that_one(tmp_path):
    data = np.stack([ramp(), 100 + ramp()], axis=-1)
    path = write_nifti(tmp_path / "t.nii.gz", data, np.eye(4))
    with pytest.raises(DataError, match=r"t\.nii\.gz: a 4D NIfTI with 2 volumes.*volume=k"):
        read_volume(path)
    raw, _ = read_raw(path, volume=1)
    np.testing.assert_array_equal(raw, 100 + ramp())
    with pytest.raises(DataError, match="volume 2 is out of range"):
        read_raw(path, volume=2)
    five = write_nifti(tmp_path / "f.nii.gz", np.zeros((3, 3, 3, 2, 2), np.float32), np.eye(4))
    with pytest.raises(DataError, match="a volume needs 3 spatial axes"):
        read_raw(five, volume=0)


def test_label_volume_must_lie_on_its_images_grid(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", ramp())
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[2:4, 1:3, 1:3] = 1
    good = write_nifti(tmp_path / "lab.nii.gz", lab)
    ds = load_volume_dataset(img, labels=good, label_map={1: "tumour"})
    assert isinstance(ds, VolumeSegmentationDataset) and ds.class_names == ["tumour"]
    assert ds.areas.tolist() == [[8]] and ds.pair(0)[1].shape == ds.volume(0).shape
    # the label volume is reoriented with its image: the tumour voxels stay on the same anatomy
    canon = np.asarray(nib.as_closest_canonical(nib.load(str(good))).dataobj)
    np.testing.assert_array_equal(ds.mask(0), canon)
    bad_shape = write_nifti(tmp_path / "short.nii.gz", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DataError, match=r"short\.nii\.gz: the label volume is 6x5x3 but its image"):
        load_volume_dataset(img, labels=bad_shape)
    shifted = PERMUTED.copy()
    shifted[0, 3] += 5.0
    off = write_nifti(tmp_path / "off.nii.gz", lab, shifted)
    with pytest.raises(DataError, match=r"off\.nii\.gz: the label volume's voxel-to-world affine"):
        load_volume_dataset(img, labels=off)
    odd = lab.copy()
    odd[0, 0, 0] = 7
    weird = write_nifti(tmp_path / "weird.nii.gz", odd)
    with pytest.raises(DataError, match=r"weird\.nii\.gz: not a binary mask.*\[0, 1, 7\]"):
        load_volume_dataset(img, labels=weird, label_map={1: "tumour"})


def test_dicom_series_reads_hounsfield_units_in_ras_with_its_spacing(tmp_path):
    vol = np.arange(5 * 6 * 8, dtype=np.int16).reshape(5, 6, 8)  # (slices, rows, cols)
    folder = write_dicom_series(tmp_path / "series", vol, spacing=(0.7, 0.8), thickness=2.5)
    raw, affine = read_raw(folder)
    assert raw.shape == (8, 6, 5)  # (cols, rows, slices): DICOM's LPS columns run along x
    np.testing.assert_allclose(np.abs(np.diag(affine))[:3], (0.8, 0.7, 2.5))
    got = read_volume(folder, VolumeSettings(window=(-1024.0, -1024.0 + 239.0))).array
    assert got.shape == (8, 6, 5)
    hu = vol.astype(np.float64) - 1024.0  # RescaleIntercept -1024
    # LPS -> RAS flips x (columns) and y (rows); slices stay in z order
    want = np.transpose(hu, (2, 1, 0))[::-1, ::-1, :]
    np.testing.assert_allclose(got, (want + 1024.0) / 239.0, atol=1e-6)
    ds = load_dataset(
        folder, volumes=True, window="abdomen", label="normal", class_names=["normal", "abnormal"]
    )
    assert isinstance(ds, VolumeDataset) and ds.spacing.tolist() == [[0.8, 0.7, 2.5]]


def test_dicom_series_without_position_or_mixed_series_is_refused(tmp_path):
    vol = np.zeros((3, 4, 4), np.int16)
    folder = write_dicom_series(tmp_path / "nopos", vol, drop=("ImagePositionPatient",))
    with pytest.raises(DataError, match=r"has no ImagePositionPatient.*affine is unknown"):
        read_raw(folder)
    mixed = write_dicom_series(tmp_path / "mixed", vol)
    write_dicom_series(mixed, vol, prefix="b")  # a second series in the same folder
    with pytest.raises(DataError, match="mixes 2 DICOM series"):
        read_raw(mixed)


def test_manifest_of_volumes_for_classification_and_segmentation(tmp_path):
    rows, seg_rows = [], []
    for i in range(4):
        img = write_nifti(tmp_path / f"case{i}.nii.gz", ramp() + i, np.eye(4))
        lab = np.zeros((6, 5, 4), np.uint8)
        lab[: i + 1] = 1
        write_nifti(tmp_path / f"case{i}_seg.nii.gz", lab, np.eye(4))
        site = "a" if i < 2 else "b"
        rows.append({"path": img.name, "label": i % 2, "site": site, "split": "train"})
        seg_rows.append({"path": img.name, "mask": f"case{i}_seg.nii.gz", "site": site})
    ds = load_dataset(write_csv(tmp_path / "cls.csv", rows), volumes=True, size=(4, 4, 4))
    assert (
        isinstance(ds, VolumeDataset) and ds.task == "binary" and ds.labels.tolist() == [0, 1, 0, 1]
    )
    assert ds.meta("domain").tolist() == ["a", "a", "b", "b"] and ds.volume(3).shape == (4, 4, 4)
    assert ds.meta("patient_id").tolist() == [f"case{i}" for i in range(4)]
    seg = load_dataset(write_csv(tmp_path / "seg.csv", seg_rows), volumes=True)
    assert isinstance(seg, VolumeSegmentationDataset) and seg.class_names == ["foreground"]
    assert seg.areas[:, 0].tolist() == [20, 40, 60, 80]
    missing = write_csv(tmp_path / "bad.csv", [{"path": "nope.nii.gz", "label": 0}])
    with pytest.raises(
        DataError, match=r"bad\.csv: row 1 \(line 2\): volume .*nope\.nii\.gz does not exist"
    ):
        load_dataset(missing, volumes=True)


def test_nnunet_folder_reads_label_names_and_modality_from_dataset_json(tmp_path):
    for d in ("imagesTr", "labelsTr"):
        (tmp_path / d).mkdir()
    for i in range(2):
        write_nifti(tmp_path / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", ramp(), np.eye(4))
        lab = np.zeros((6, 5, 4), np.uint8)
        lab[0, 0, : i + 1] = 2
        lab[5, 4, 3] = 1
        write_nifti(tmp_path / "labelsTr" / f"liver_{i:03d}.nii.gz", lab, np.eye(4))
    info = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    ds = load_dataset(tmp_path)  # imagesTr/labelsTr: volumes without asking
    assert ds.class_names == ["liver", "tumour"] and ds.modality == "ct"
    assert ds.areas.tolist() == [[1, 1], [1, 2]]
    assert ds.meta("patient_id").tolist() == ["liver_000", "liver_001"]


def test_crop_foreground_and_size_crop_image_and_labels_alike(tmp_path):
    data = np.zeros((12, 12, 12), np.float32)
    data[3:9, 4:8, 2:10] = 1.0
    lab = (data > 0).astype(np.uint8)
    img = write_nifti(tmp_path / "i.nii.gz", data, np.eye(4))
    lp = write_nifti(tmp_path / "l.nii.gz", lab, np.eye(4))
    ds = load_volume_dataset(img, labels=lp, window="minmax", crop_foreground=True)
    v, m = ds.pair(0)
    assert v.shape == (6 + 4, 4 + 4, 8 + 4)  # the box plus a 2-voxel margin
    np.testing.assert_array_equal(m, v > 0.5)
    ds = load_volume_dataset(img, labels=lp, window="minmax", size=(8, 8, 8))
    assert ds.pair(0)[0].shape == (8, 8, 8) and ds.areas.tolist() == [
        [int(lab[2:10, 2:10, 2:10].sum())]
    ]
