"""Segmentation readers: folders, manifests and NIfTI volumes, and the errors bad input gets."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from clinadapt import load_dataset
from clinadapt.data.seg_readers import (
    load_mask_folder,
    load_nifti_segmentation,
    load_seg_manifest,
    parse_spacing,
)
from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.errors import DataError
from filewriters import write_csv, write_dicom

RNG = np.random.default_rng(0)


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode == "P":
        im = im.convert("P")
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        im.putdata(arr.ravel().tolist())
    im.save(path)
    return arr


def square(h=8, w=10, value=255, at=(2, 3, 5, 7)):
    m = np.zeros((h, w), np.uint8)
    r0, c0, r1, c1 = at
    m[r0:r1, c0:c1] = value
    return m


def test_folder_pairs_by_name_with_suffixes_and_binary_inference(tmp_path):
    imgs = {
        n: save(tmp_path / "images" / f"{n}.png", RNG.integers(0, 255, (8, 10), np.uint8))
        for n in "abc"
    }
    save(tmp_path / "masks" / "a.png", square())  # same stem, 0/255
    save(tmp_path / "masks" / "b_segmentation.png", square(value=255, at=(0, 0, 1, 1)))
    save(tmp_path / "masks" / "c_mask.png", np.zeros((8, 10), np.uint8))  # empty
    ds = load_dataset(tmp_path)
    assert isinstance(ds, SegmentationDataset) and ds.class_names == ["foreground"]
    assert ds.binary and ds.areas[:, 0].tolist() == [12, 1, 0]
    img, mask = ds.pair(0)
    assert np.array_equal(img, imgs["a"]) and mask.max() == 1 and mask.sum() == 12
    assert ds.spacing_origin == "assumed 1 mm (unknown)"
    assert len(load_mask_folder(tmp_path, skip_empty=True)) == 2
    named = load_mask_folder(tmp_path, class_names=["lesion"], spacing=0.5)
    assert named.class_names == ["lesion"] and named.spacing[0].tolist() == [0.5, 0.5]
    assert named.spacing_origin == "given"


def test_folder_with_split_folders_palette_masks_and_label_map(tmp_path):
    for split, n in (("train", "x"), ("test", "y")):
        save(tmp_path / split / "images" / f"{n}.png", RNG.integers(0, 255, (8, 10), np.uint8))
        m = square(value=1)
        m[6:, :2] = 2
        save(tmp_path / split / "masks" / f"{n}.png", m, mode="P")
    ds = load_mask_folder(tmp_path, label_map={1: "liver", 2: "kidney"})
    assert ds.class_names == ["liver", "kidney"] and ds.splits == ["test", "train"]
    assert ds.areas.tolist() == [[12, 4], [12, 4]]
    # inferred from the values 0..2 without a map
    assert load_dataset(tmp_path).class_names == ["1", "2"]
    # a map can send a value to the background
    only = load_mask_folder(tmp_path, label_map={1: "liver", 2: "background"})
    assert only.binary and only.areas[:, 0].tolist() == [12, 12]


def test_folder_errors_name_the_file(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((8, 10), np.uint8))
    save(tmp_path / "images" / "b.png", np.zeros((8, 10), np.uint8))
    save(tmp_path / "masks" / "a.png", square())
    with pytest.raises(DataError, match=r"images/b\.png: no mask file for this image .*b\.\*"):
        load_mask_folder(tmp_path)
    save(tmp_path / "masks" / "b.png", square(h=9))
    with pytest.raises(
        DataError, match=r"images/b\.png: the image is 8x10 but its mask .*masks/b\.png is 9x10"
    ):
        load_mask_folder(tmp_path)
    save(tmp_path / "masks" / "b.png", square(value=128) + square(value=127, at=(0, 0, 1, 1)))
    with pytest.raises(
        DataError, match=r"masks/b\.png: not a binary mask: it holds the values \[0, 127, 128\]"
    ):
        load_mask_folder(tmp_path, class_names=["lesion"])
    with pytest.raises(
        DataError, match=r"masks/b\.png: mask value\(s\) \[127, 128\] are outside the label map"
    ):
        load_mask_folder(tmp_path, label_map={255: "lesion", 1: "cyst"})
    save(tmp_path / "masks" / "b.png", square())
    save(tmp_path / "masks" / "c.png", square())
    with pytest.raises(DataError, match=r"1 mask\(s\) have no image .*c\.png"):
        load_mask_folder(tmp_path)
    (tmp_path / "masks" / "c.png").unlink()
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    save(tmp_path / "masks" / "b.png", rgb)
    with pytest.raises(DataError, match=r"masks/b\.png: a colour mask"):
        load_mask_folder(tmp_path)
    save(tmp_path / "masks" / "b.png", square())
    save(tmp_path / "masks" / "b_mask.png", square())
    with pytest.raises(DataError, match="2 candidate masks"):
        load_mask_folder(tmp_path)


def test_manifest_with_metadata_spacing_and_missing_mask(tmp_path):
    for n in ("p1a", "p1b", "p2a"):
        save(tmp_path / "img" / f"{n}.png", RNG.integers(0, 255, (8, 10), np.uint8))
        save(tmp_path / "seg" / f"{n}.png", square(value=1))
    rows = [
        {
            "path": "img/p1a.png",
            "mask": "seg/p1a.png",
            "site": "A",
            "patient": "p1",
            "split": "train",
            "spacing": "0.5x0.25",
        },
        {
            "path": "img/p1b.png",
            "mask": "seg/p1b.png",
            "site": "A",
            "patient": "p1",
            "split": "train",
            "spacing": "",
        },
        {
            "path": "img/p2a.png",
            "mask": "seg/p2a.png",
            "site": "B",
            "patient": "p2",
            "split": "test",
            "spacing": "0.7",
        },
    ]
    csv = write_csv(tmp_path / "seg.csv", rows)
    ds = load_dataset(csv, class_names=["tumour"])
    assert isinstance(ds, SegmentationDataset) and ds.class_names == ["tumour"]
    assert ds.meta("domain").tolist() == ["A", "A", "B"]
    assert ds.meta("patient_id").tolist() == ["p1", "p1", "p2"]
    assert "spacing" not in ds.metadata and "mask" not in ds.metadata
    assert ds.spacing.tolist() == [[0.5, 0.25], [1.0, 1.0], [0.7, 0.7]]
    assert "manifest column (2 images)" in ds.spacing_origin
    assert "assumed 1 mm (unknown) (1 images)" in ds.spacing_origin
    assert ds.areas_mm2()[0, 0] == pytest.approx(12 * 0.125)
    rows[2]["mask"] = "seg/gone.png"
    write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"bad\.csv: 1 mask path\(s\) do not exist .*seg/gone\.png"):
        load_seg_manifest(tmp_path / "bad.csv")
    rows[2]["mask"], rows[2]["spacing"] = "seg/p2a.png", "-1"
    write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"row 3 \(line 4\): pixel spacing '-1'"):
        load_seg_manifest(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"missing column\(s\) \['outline'\]"):
        load_seg_manifest(csv, mask_col="outline")


def test_manifest_without_mask_column_is_classification(tmp_path):
    save(tmp_path / "a.png", np.zeros((8, 10), np.uint8))
    csv = write_csv(tmp_path / "cls.csv", [{"path": "a.png", "label": "x"}])
    assert not isinstance(load_dataset(csv), SegmentationDataset)


def test_dicom_images_give_their_pixel_spacing(tmp_path):
    raw = RNG.integers(0, 4000, (8, 10)).astype(np.uint16)
    write_dicom(tmp_path / "images" / "ct1.dcm", raw, PixelSpacing=[0.6, 0.8])
    save(tmp_path / "masks" / "ct1.png", square())
    ds = load_dataset(tmp_path)
    assert ds.spacing.tolist() == [[0.6, 0.8]] and ds.spacing_origin == "file header"
    assert ds.pair(0)[0].shape == (8, 10)


def nifti(path: Path, data: np.ndarray, zooms=(0.8, 0.9, 2.5)) -> Path:
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    nib.save(img, str(path))
    return path


def _volumes(tmp_path, zooms=(0.8, 0.9, 2.5)):
    labels = np.zeros((12, 10, 5), np.int16)
    labels[2:6, 3:8, 1] = 1
    labels[7:10, 1:3, 1] = 2
    labels[4:9, 4:6, 3] = 1
    image = np.asarray(RNG.normal(0, 1, labels.shape), np.float32) + 10 * labels
    return nifti(tmp_path / "case_0000.nii.gz", image, zooms), nifti(
        tmp_path / "case.nii.gz", labels, zooms
    )


def test_nifti_label_volume_as_slices(tmp_path):
    img, lab = _volumes(tmp_path)
    ds = load_dataset(img, labels=lab, label_map={1: "liver", 2: "tumour"})
    assert isinstance(ds, SegmentationDataset) and len(ds) == 5
    assert ds.class_names == ["liver", "tumour"]
    assert ds.meta("slice").tolist() == ["0", "1", "2", "3", "4"]
    assert ds.meta("patient_id")[0] == "case_0000"
    assert ds.areas.tolist() == [[0, 0], [20, 6], [0, 0], [10, 0], [0, 0]]
    # slices are rot90 of the (X, Y) plane: rows run along Y, columns along X
    assert ds.spacing[0] == pytest.approx([0.9, 0.8]) and ds.spacing_origin == "file header"
    image, mask = ds.pair(1)
    assert image.shape == mask.shape == (10, 12)
    assert image[mask == 2].mean() > image[mask == 1].mean() > image[mask == 0].mean()
    skipped = load_nifti_segmentation(img, lab, ["liver", "tumour"], skip_empty=True)
    assert skipped.meta("slice").tolist() == ["1", "3"] and skipped.class_names == [
        "liver",
        "tumour",
    ]
    assert load_nifti_segmentation(img, lab).class_names == ["1", "2"]
    with pytest.raises(
        DataError, match=r"case\.nii\.gz \(slice 1\): mask value\(s\) \[2\] are outside"
    ):
        load_nifti_segmentation(img, lab, {1: "liver", 3: "cyst"})
    with pytest.raises(DataError, match=r"case\.nii\.gz \(slice 1\): not a binary mask"):
        load_nifti_segmentation(img, lab, class_names=["liver"])


def test_nifti_grid_mismatch(tmp_path):
    img, _ = _volumes(tmp_path)
    small = nifti(tmp_path / "small.nii.gz", np.zeros((12, 9, 5), np.int16))
    with pytest.raises(
        DataError, match=r"small\.nii\.gz: the label volume is 12x9x5 but its image .*12x10x5"
    ):
        load_nifti_segmentation(img, small)
    other = nifti(tmp_path / "other.nii.gz", np.zeros((12, 10, 5), np.int16), zooms=(1, 1, 1))
    with pytest.raises(DataError, match="not on the image's grid"):
        load_nifti_segmentation(img, other)


def test_folder_of_nifti_volumes_nnunet_naming(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _volumes(tmp_path / "images")
    (tmp_path / "images" / "case.nii.gz").rename(tmp_path / "masks" / "case.nii.gz")
    ds = load_dataset(tmp_path, label_map=["liver", "tumour"], skip_empty=True)
    assert len(ds) == 2 and ds.class_names == ["liver", "tumour"]
    assert ds.spacing[0] == pytest.approx([0.9, 0.8])


def test_parse_spacing():
    assert parse_spacing("0.7", "x") == (0.7, 0.7)
    assert parse_spacing("0.5 x 0.25", "x") == (0.5, 0.25)
    assert parse_spacing((1, 2), "x") == (1.0, 2.0)
    assert parse_spacing("", "x") is None
    with pytest.raises(DataError, match="here: pixel spacing 'a'"):
        parse_spacing("a", "here")
