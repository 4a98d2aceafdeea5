"""Image files, class folders, CSV manifests, DICOM and NIfTI, all generated in tmp_path."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from clinadapt.config import apply_settings
from clinadapt.data import load_dataset
from clinadapt.data.dicom import CT_WINDOWS, read_dicom
from clinadapt.data.folder import load_image_folder, load_manifest, read_image_file
from clinadapt.data.nifti import load_nifti_volume, read_nifti_slices
from clinadapt.errors import ConfigError, DataError
from filewriters import write_csv, write_dicom

RNG = np.random.default_rng(0)


# --- writers -----------------------------------------------------------------------------------
def png(path: Path, arr: np.ndarray | None = None, mode: str | None = None) -> np.ndarray:
    arr = RNG.integers(0, 256, (8, 10), dtype=np.uint8) if arr is None else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return arr


def window_by_hand(values, center, width):
    lo = center - width / 2
    return np.rint(np.clip((values - lo) / width, 0, 1) * 255).astype(np.uint8)


def minmax_by_hand(values):
    values = values.astype(np.float64)
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


# --- single image files ------------------------------------------------------------------------
def test_png_grey_rgb_and_jpeg(tmp_path):
    grey = png(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "g.png"), grey)
    rgb = png(tmp_path / "c.PNG", RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    np.testing.assert_array_equal(read_image_file(tmp_path / "c.PNG"), rgb)
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    assert read_image_file(tmp_path / "c.jpg").shape == (6, 5, 3)
    Image.fromarray(grey).save(tmp_path / "g.bmp")
    np.testing.assert_array_equal(read_image_file(tmp_path / "g.bmp"), grey)


def test_16bit_png_is_stretched_to_8bit(tmp_path):
    raw = np.array([[100, 1100], [2100, 4195]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    out = read_image_file(tmp_path / "x16.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, minmax_by_hand(raw))  # [[0, 62], [125, 255]]
    np.testing.assert_array_equal(out, [[0, 62], [125, 255]])


def test_alpha_palette_and_cmyk_images(tmp_path):
    rgba = RNG.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "a.png"), rgba[..., :3])
    la = RNG.integers(0, 256, (4, 4, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "la.png"), la[..., 0])
    rgb = RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(8).save(tmp_path / "p.png")
    pal = read_image_file(tmp_path / "p.png")
    assert pal.shape == (5, 5, 3) and pal.dtype == np.uint8
    grey = RNG.integers(0, 256, (5, 5), dtype=np.uint8)
    Image.fromarray(grey).convert("P").save(tmp_path / "pg.png")
    assert read_image_file(tmp_path / "pg.png").shape == (5, 5)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "k.tif")
    np.testing.assert_array_equal(
        read_image_file(tmp_path / "k.tif"), np.asarray(cmyk.convert("RGB"))
    )


def test_corrupt_truncated_and_unsupported_files_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"bad\.png: corrupt image"):
        read_image_file(tmp_path / "bad.png")
    (tmp_path / "noise.jpg").write_bytes(b"definitely not an image")
    with pytest.raises(DataError, match=r"noise\.jpg: not a readable image"):
        read_image_file(tmp_path / "noise.jpg")
    png(tmp_path / "t.png", RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.png"):
        read_image_file(tmp_path / "t.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type"):
        read_image_file(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"gone\.png: no such image file"):
        read_image_file(tmp_path / "gone.png")


def test_wrong_channel_count_names_the_file(tmp_path):
    np.save(tmp_path / "two.npy", np.zeros((6, 6, 2), np.uint8))
    with pytest.raises(DataError, match=r"two\.npy: unsupported image shape \(6, 6, 2\)"):
        read_image_file(tmp_path / "two.npy")
    np.save(tmp_path / "f.npy", np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))
    assert read_image_file(tmp_path / "f.npy")[3, 3] == 255
    for bad in (np.full((4, 4), np.nan), np.full((4, 4), np.inf)):
        np.save(tmp_path / "nan.npy", bad.astype(np.float32))  # not a black image
        with pytest.raises(DataError, match=r"nan\.npy: the image holds no finite value"):
            read_image_file(tmp_path / "nan.npy")


def test_multipage_tiff_is_refused(tmp_path):
    a, b = (Image.fromarray(np.zeros((4, 4), np.uint8)) for _ in range(2))
    a.save(tmp_path / "stack.tif", save_all=True, append_images=[b])
    with pytest.raises(DataError, match=r"stack\.tif: a TIFF with 2 pages"):
        read_image_file(tmp_path / "stack.tif")


# --- image folders -----------------------------------------------------------------------------
def test_class_folders(tmp_path):
    for cls, n in (("pneumonia", 2), ("normal", 3)):
        for i in range(n):
            png(tmp_path / "xr" / cls / f"{i}.png")
    (tmp_path / "xr" / "normal" / ".DS_Store").write_text("junk")
    (tmp_path / "xr" / "normal" / "README.txt").write_text("junk")
    ds = load_image_folder(tmp_path / "xr", modality="xray")
    assert ds.class_names == ["normal", "pneumonia"] and ds.task == "binary"
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.modality == "xray" and ds.splits == []
    assert ds.image(4).shape == (8, 10)
    given = load_image_folder(tmp_path / "xr", class_names=["pneumonia", "normal"])
    assert given.labels.tolist() == [1, 1, 1, 0, 0]


def test_split_folders(tmp_path):
    for split, cls, n in (("train", "a", 2), ("train", "b", 2), ("val", "a", 1), ("test", "b", 1)):
        for i in range(n):
            png(tmp_path / "d" / split / cls / f"{i}.png")
    ds = load_image_folder(tmp_path / "d")
    assert ds.splits == ["test", "train", "val"] and len(ds.split("train")) == 4
    assert ds.split("test").labels.tolist() == [1]


def test_folder_errors(tmp_path):
    png(tmp_path / "f" / "a" / "0.png")
    (tmp_path / "f" / "b").mkdir()
    with pytest.raises(DataError, match=r"f/b: the class folder has no images"):
        load_image_folder(tmp_path / "f")
    with pytest.raises(DataError, match=r"folders \['b'\] are not among the classes \['a', 'c'\]"):
        load_image_folder(tmp_path / "f", class_names=["a", "c"])
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "e")
    png(tmp_path / "s" / "train" / "a" / "0.png")
    (tmp_path / "s" / "test").mkdir()
    with pytest.raises(DataError, match=r"s/test: the split folder is empty"):
        load_image_folder(tmp_path / "s")
    png(tmp_path / "m" / "train" / "a" / "0.png")
    png(tmp_path / "m" / "cats" / "0.png")
    with pytest.raises(
        DataError, match=r"mixes split folders \(train\) with other folders \(cats\)"
    ):
        load_image_folder(tmp_path / "m")
    with pytest.raises(DataError, match="no such image folder"):
        load_image_folder(tmp_path / "nowhere")


def test_corrupt_image_in_folder_fails_when_read(tmp_path):
    png(tmp_path / "f" / "a" / "ok.png")
    (tmp_path / "f" / "a" / "broken.png").write_bytes(b"not a png")
    ds = load_image_folder(tmp_path / "f")  # lazy: loading the list works
    with pytest.raises(DataError, match=r"broken\.png"):
        ds.image(0)
    assert ds.image(1).shape == (8, 10)


# --- manifests ---------------------------------------------------------------------------------
def test_manifest_labels_paths_and_metadata(tmp_path):
    for i in range(4):
        png(tmp_path / "img" / f"{i}.png")
    png(tmp_path / "elsewhere" / "abs.png")
    rows = [
        {
            "path": "img/0.png",
            "label": "effusion",
            "site": "A",
            "Sex": "F",
            "patient": "p0",
            "split": "train",
            "view": "PA",
        },
        {
            "path": "img/1.png",
            "label": "normal",
            "site": "A",
            "Sex": "M",
            "patient": "p1",
            "split": "Validation",
            "view": "AP",
        },
        {
            "path": "img/2.png",
            "label": "normal",
            "site": "B",
            "Sex": "",
            "patient": "p1",
            "split": "test",
            "view": "PA",
        },
        {
            "path": "img/3.png",
            "label": "effusion",
            "site": "B",
            "Sex": "F",
            "patient": "p2",
            "split": "test",
            "view": "AP",
        },
        {
            "path": str(tmp_path / "elsewhere" / "abs.png"),
            "label": "normal",
            "site": "B",
            "Sex": "M",
            "patient": "p3",
            "split": "train",
            "view": "PA",
        },
    ]
    ds = load_manifest(write_csv(tmp_path / "m.csv", rows), modality="xray")
    assert ds.class_names == ["effusion", "normal"] and ds.labels.tolist() == [0, 1, 1, 0, 1]
    assert set(ds.metadata) == {"domain", "sex", "patient_id", "split", "view"}
    assert ds.meta("domain").tolist() == ["A", "A", "B", "B", "B"]
    assert ds.meta("sex").tolist() == ["F", "M", "unknown", "F", "M"]
    assert ds.meta("split").tolist() == ["train", "val", "test", "test", "train"]
    assert ds.meta("view").tolist()[:2] == ["PA", "AP"] and ds.name == "m"
    np.testing.assert_array_equal(
        ds.image(4), np.asarray(Image.open(tmp_path / "elsewhere" / "abs.png"))
    )


def test_manifest_integer_labels_root_and_class_names(tmp_path):
    for i in range(3):
        png(tmp_path / "data" / f"{i}.png")
    csv_path = write_csv(
        tmp_path / "labels.csv", [{"file": f"{i}.png", "y": i % 3} for i in range(3)]
    )
    ds = load_manifest(csv_path, path_col="file", label_col="y", root=tmp_path / "data")
    assert ds.class_names == ["0", "1", "2"] and ds.labels.tolist() == [0, 1, 2]
    named = load_manifest(
        csv_path, "file", "y", class_names=["a", "b", "c"], root=tmp_path / "data"
    )
    assert named.class_names == ["a", "b", "c"] and named.task == "multiclass"
    assert not ds.notes and "notes" not in ds.summary()


def test_integer_labels_with_gaps_are_the_classes_present(tmp_path):
    """{0, 5} is a binary task with classes "0" and "5", not six classes with four phantoms."""
    for i in range(4):
        png(tmp_path / f"{i}.png")
    rows = [{"path": f"{i}.png", "label": v} for i, v in enumerate([0, 5, "05", 0])]
    ds = load_manifest(write_csv(tmp_path / "m.csv", rows))
    assert ds.class_names == ["0", "5"] and ds.task == "binary"
    assert ds.labels.tolist() == [0, 1, 1, 0]
    (note,) = ds.summary()["notes"]
    assert "m.csv" in note and "[0, 5]" in note and "class_names=" in note
    with pytest.raises(DataError, match="unknown label '5'"):  # named classes: 5 is no index
        load_manifest(tmp_path / "m.csv", class_names=["a", "b"])
    vol = nifti(tmp_path / "v.nii", RNG.uniform(0, 1, (4, 4, 3)).astype(np.float32))
    ds = load_nifti_volume(vol, label=[2, 7, 2])
    assert ds.class_names == ["2", "7"] and ds.labels.tolist() == [0, 1, 0]
    assert ds.task == "binary" and "[2, 7]" in ds.notes[0]


def test_manifest_multilabel(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png")
    rows = [
        {"path": "0.png", "label": "mass|nodule"},
        {"path": "1.png", "label": ""},
        {"path": "2.png", "label": "nodule"},
    ]
    ds = load_manifest(write_csv(tmp_path / "m.csv", rows), multilabel_sep="|")
    assert ds.task == "multilabel" and ds.class_names == ["mass", "nodule"]
    assert ds.labels.tolist() == [[1, 1], [0, 0], [0, 1]]
    # `-o data_options.multilabel_sep=|` reaches the reader as "" (YAML's block indicator)
    with pytest.raises(ConfigError, match=r"multilabel_sep='': .*multilabel_sep=\"\|\""):
        load_manifest(tmp_path / "m.csv", multilabel_sep="")
    assert apply_settings({}, ["data_options.multilabel_sep=|"]) == {
        "data_options": {"multilabel_sep": ""}
    }


def test_manifest_errors_name_row_value_and_columns(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match=r"nope\.csv: no such manifest file"):
        load_manifest(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the CSV is empty"):
        load_manifest(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("path,label\n")
    with pytest.raises(
        DataError, match=r"header\.csv: the CSV has a header \(path, label\) but no rows"
    ):
        load_manifest(tmp_path / "header.csv")
    cols = write_csv(tmp_path / "cols.csv", [{"filename": "0.png", "diagnosis": "a"}])
    with pytest.raises(
        DataError,
        match=r"missing column\(s\) \['path', 'label'\]; the columns are \['filename', 'diagnosis'\]",
    ):
        load_manifest(cols)
    rows = [{"path": f"{i}.png", "label": lab} for i, lab in enumerate(["a", "b", "zebra"])]
    with pytest.raises(DataError, match=r"row 3 \(line 4\): unknown label 'zebra'.*\['a', 'b'\]"):
        load_manifest(write_csv(tmp_path / "lab.csv", rows), class_names=["a", "b"])
    rows[2]["label"] = "7"
    with pytest.raises(DataError, match=r"row 3 .*unknown label '7'"):
        load_manifest(write_csv(tmp_path / "lab.csv", rows), class_names=["a", "b"])
    rows[2]["label"] = "1"
    with pytest.raises(DataError, match=r"mix class names \('a', 'b'\) and integers \('1'\)"):
        load_manifest(write_csv(tmp_path / "lab.csv", rows))
    assert (
        load_manifest(write_csv(tmp_path / "lab.csv", rows), class_names=["a", "b"]).labels[2] == 1
    )
    rows[2]["label"] = "A"  # one class written two ways would be a phantom third class
    with pytest.raises(
        DataError, match=r"lab\.csv: labels 'A' and 'a' in 'label' differ only in case"
    ):
        load_manifest(write_csv(tmp_path / "lab.csv", rows))
    rows[2]["label"] = ""
    with pytest.raises(DataError, match=r"row 3 \(line 4\) has no label"):
        load_manifest(write_csv(tmp_path / "lab.csv", rows))
    gone = [{"path": f"missing{i}.png", "label": "a"} for i in range(7)]
    with pytest.raises(
        DataError, match=r"7 image path\(s\) do not exist.*missing0\.png.*missing4\.png and 2 more"
    ):
        load_manifest(write_csv(tmp_path / "gone.csv", gone))
    dup = [
        {"path": "0.png", "label": "a"},
        {"path": "1.png", "label": "a"},
        {"path": "./0.png", "label": "b"},
    ]
    with pytest.raises(DataError, match=r"duplicate image path.*0\.png \(rows 1, 3\)"):
        load_manifest(
            write_csv(tmp_path / "dup.csv", [dup[0], dup[1], {"path": "0.png", "label": "b"}])
        )
    split = [{"path": "0.png", "label": "a", "split": "dev"}]
    with pytest.raises(DataError, match=r"row 1 .*split 'dev'"):
        load_manifest(write_csv(tmp_path / "split.csv", split))


def test_manifest_checks_images_lazily(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    np.save(tmp_path / "two.npy", np.zeros((4, 4, 2), np.uint8))
    rows = [{"path": p, "label": "a"} for p in ("ok.png", "corrupt.png", "two.npy")]
    ds = load_manifest(write_csv(tmp_path / "m.csv", rows))
    assert ds.image(0).shape == (8, 10)
    with pytest.raises(DataError, match=r"corrupt\.png"):
        ds.image(1)
    with pytest.raises(DataError, match=r"two\.npy: unsupported image shape \(4, 4, 2\)"):
        ds.image(2)


# --- DICOM -------------------------------------------------------------------------------------
def test_dicom_rescale_and_explicit_window(tmp_path):
    raw = np.array([[0, 900], [1000, 1100], [1224, 3000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", raw, RescaleSlope=1, RescaleIntercept=-1024)
    hu = raw.astype(float) - 1024  # [[-1024, -124], [-24, 76], [200, 1976]]
    out = read_dicom(path, window=(40, 400))  # [-160, 240] -> 0..255
    np.testing.assert_array_equal(out, window_by_hand(hu, 40, 400))
    np.testing.assert_array_equal(out, [[0, 23], [87, 150], [230, 255]])
    np.testing.assert_array_equal(read_dicom(path, "lung"), window_by_hand(hu, -600, 1500))
    np.testing.assert_array_equal(read_dicom(path, "bone"), window_by_hand(hu, *CT_WINDOWS["bone"]))


def test_dicom_slope_signed_and_file_window(tmp_path):
    raw = np.array([[-50, 0], [25, 300]], dtype=np.int16)
    path = write_dicom(
        tmp_path / "s.dcm",
        raw,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=[40, 300],
        WindowWidth=[400, 1500],
    )
    values = raw * 2.0 - 100  # [[-200, -100], [-50, 500]]
    np.testing.assert_array_equal(read_dicom(path), window_by_hand(values, 40, 400))
    np.testing.assert_array_equal(read_dicom(path, "minmax"), minmax_by_hand(values))


def test_dicom_minmax_fallback_and_monochrome1(tmp_path):
    raw = np.array([[10, 20, 30], [40, 50, 110]], dtype=np.uint16)
    m2 = write_dicom(tmp_path / "m2.dcm", raw, modality="DX", bits=12)
    np.testing.assert_array_equal(read_dicom(m2), minmax_by_hand(raw))
    m1 = write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", modality="DX", bits=12)
    np.testing.assert_array_equal(read_dicom(m1), 255 - minmax_by_hand(raw))
    with pytest.raises(DataError, match=r"m2\.dcm: the 'lung' window is in Hounsfield units.*'DX'"):
        read_dicom(m2, "lung")
    with pytest.raises(DataError, match=r"unknown window 'liverish'"):
        read_dicom(m2, "liverish")


def test_dicom_rgb_and_multiframe(tmp_path):
    rgb = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, "RGB", modality="XC")
    np.testing.assert_array_equal(read_dicom(path), rgb)
    frames = np.stack([np.full((3, 3), v, np.uint16) for v in (0, 100, 200)])
    frames[1, 0, 0] = 50
    mf = write_dicom(tmp_path / "mf.dcm", frames, modality="MR", bits=16)
    with pytest.raises(DataError, match=r"mf\.dcm: a multi-frame DICOM with 3 frames"):
        read_dicom(mf)
    np.testing.assert_array_equal(read_dicom(mf, frame=1), minmax_by_hand(frames[1]))
    with pytest.raises(DataError, match="frame 3 is out of range"):
        read_dicom(mf, frame=3)


def test_dicom_bad_files_are_named(tmp_path):
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 50 + b"not dicom at all")
    with pytest.raises(DataError, match=r"fake\.dcm: not a DICOM file"):
        read_dicom(tmp_path / "fake.dcm")
    good = write_dicom(tmp_path / "cut.dcm", RNG.integers(0, 4000, (64, 64), dtype=np.uint16))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 4000])
    with pytest.raises(DataError, match=r"cut\.dcm"):
        read_dicom(good)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.PatientID = "x"
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"nopix\.dcm: the DICOM file has no pixel data"):
        read_dicom(tmp_path / "nopix.dcm")


def test_dicom_through_read_image_file_with_and_without_extension(tmp_path):
    raw = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    write_dicom(tmp_path / "IM0001", raw, modality="MR")
    np.testing.assert_array_equal(read_image_file(tmp_path / "IM0001"), [[0, 85], [170, 255]])
    write_dicom(tmp_path / "a.dcm", raw, modality="MR")
    np.testing.assert_array_equal(read_image_file(tmp_path / "a.dcm"), [[0, 85], [170, 255]])


# --- NIfTI -------------------------------------------------------------------------------------
def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_nifti_slices_match_the_array(tmp_path):
    data = RNG.uniform(-100, 300, (6, 7, 5)).astype(np.float32)
    path = nifti(tmp_path / "vol.nii.gz", data)
    imgs = read_nifti_slices(path, slices="all", window=(0, 200))
    assert len(imgs) == 5 and imgs[0].shape == (7, 6) and imgs[0].dtype == np.uint8
    expect = np.rint(np.clip(np.rot90(data[:, :, 3]) / 200.0, 0, 1) * 255)
    np.testing.assert_array_equal(imgs[3], expect)
    lo, hi = np.percentile(data, [0.5, 99.5])
    (mid,) = read_nifti_slices(path)  # middle slice, percentile window
    np.testing.assert_array_equal(
        mid, np.rint(np.clip((np.rot90(data[:, :, 2]) - lo) / (hi - lo), 0, 1) * 255)
    )
    (sag,) = read_nifti_slices(path, axis=0, slices=1, window=None)
    assert sag.shape == (5, 7)
    np.testing.assert_array_equal(
        sag, np.rint((np.rot90(data[1]) - data.min()) / (data.max() - data.min()) * 255)
    )


def test_nifti_canonical_orientation_and_4d(tmp_path):
    data = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    las = np.diag([-1.0, 1, 1, 1])  # x runs right-to-left: canonical flips axis 0
    path = nifti(tmp_path / "las.nii", data, las)
    (img,) = read_nifti_slices(path, slices=0, window=(0, 23))
    np.testing.assert_array_equal(img, np.rint(np.rot90(data[::-1, :, 0]) / 23 * 255))
    four = np.stack([data, data + 100], axis=-1)
    path4 = nifti(tmp_path / "t.nii", four)
    np.testing.assert_array_equal(
        read_nifti_slices(path4, slices=1, window=(0, 200), volume=0)[0],
        np.rint(np.rot90(data[:, :, 1]) / 200 * 255),
    )
    # which of several volumes to read is the user's call, never a silent volume 0
    with pytest.raises(DataError, match=r"t\.nii: a 4D NIfTI with 2 volumes.*volume=k"):
        read_nifti_slices(path4, slices=1)
    with pytest.raises(DataError, match=r"t\.nii: a 4D NIfTI with 2 volumes"):
        read_image_file(path4)
    one = nifti(tmp_path / "t1.nii", four[..., :1])  # a single volume needs no choice
    assert read_nifti_slices(one, slices=1, window=(0, 200))[0].shape == (3, 4)
    np.testing.assert_array_equal(
        read_nifti_slices(path4, slices=1, window=(0, 200), volume=1)[0],
        np.rint(np.rot90(data[:, :, 1] + 100) / 200 * 255),
    )


def test_nifti_volume_dataset_and_errors(tmp_path):
    data = RNG.uniform(0, 1, (5, 5, 4)).astype(np.float32)
    path = nifti(tmp_path / "case_007.nii.gz", data)
    ds = load_nifti_volume(path, label="tumour", class_names=["healthy", "tumour"], modality="ct")
    assert len(ds) == 4 and ds.labels.tolist() == [1] * 4 and ds.task == "binary"
    assert set(ds.meta("patient_id")) == {"case_007"} and ds.meta("slice").tolist() == [
        "0",
        "1",
        "2",
        "3",
    ]
    np.testing.assert_array_equal(ds.image(2), read_nifti_slices(path, slices=2)[0])
    some = load_nifti_volume(path, slices=[3, 1], metadata={"split": "test"})
    assert some.class_names == ["unlabelled"] and some.meta("slice").tolist() == ["3", "1"]
    assert some.splits == ["test"]
    with pytest.raises(
        DataError, match=r"case_007\.nii\.gz: slice 9 is out of range; axis 2 has 4 slices"
    ):
        read_nifti_slices(path, slices=9)
    with pytest.raises(DataError, match=r"case_007\.nii\.gz: slice label #0 'cyst'"):
        load_nifti_volume(path, label="cyst", class_names=["healthy", "tumour"])
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match=r"junk\.nii: not a readable NIfTI"):
        read_nifti_slices(tmp_path / "junk.nii")
    with pytest.raises(DataError, match="slices must be 'middle', 'all'"):
        read_nifti_slices(path, slices="some")


def test_manifest_with_nifti_slices_and_dispatch(tmp_path):
    data = RNG.uniform(0, 1, (5, 6, 4)).astype(np.float32)
    nifti(tmp_path / "v.nii.gz", data)
    png(tmp_path / "x.png")
    rows = [
        {"path": "v.nii.gz", "label": "a", "slice": "0"},
        {"path": "v.nii.gz", "label": "b", "slice": "3"},
        {"path": "x.png", "label": "b", "slice": ""},
    ]
    write_csv(tmp_path / "manifest.csv", rows)
    ds = load_dataset(tmp_path)  # a directory with manifest.csv
    np.testing.assert_array_equal(
        ds.image(1), read_nifti_slices(tmp_path / "v.nii.gz", slices=3)[0]
    )
    assert ds.describe(0).endswith("v.nii.gz (slice 0)") and ds.image(2).shape == (8, 10)
    assert ds.name == tmp_path.name
    assert len(load_dataset(tmp_path / "v.nii.gz")) == 4
    png(tmp_path / "tree" / "a" / "0.png")
    assert load_dataset(tmp_path / "tree").class_names == ["a"]
