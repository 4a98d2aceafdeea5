"""MedMNIST readers on fake files in the official .npz format (no download)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from clinadapt.data import DATASETS, list_datasets
from clinadapt.data import medmnist as mm
from clinadapt.errors import DataError

COUNTS = {"train": 6, "val": 3, "test": 4}


def make_npz(path: Path, flag: str, size: int = 28, counts=COUNTS, seed: int = 0, **override):
    """Write a small file with the official keys, shapes and dtypes of ``flag``."""
    info = mm.INFO[flag]
    rng = np.random.default_rng(seed)
    k = len(info.class_names)
    arrays = {}
    for split, n in counts.items():
        shape = (n, size, size) if info.n_channels == 1 else (n, size, size, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if info.task == "multilabel":
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, k), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(n) % k).astype(np.uint8)[:, None]
    arrays.update(override)
    arrays = {key: v for key, v in arrays.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


FACTS = {  # flag: (classes, channels, task)
    "pathmnist": (9, 3, "multiclass"),
    "chestmnist": (14, 1, "multilabel"),
    "dermamnist": (7, 3, "multiclass"),
    "octmnist": (4, 1, "multiclass"),
    "pneumoniamnist": (2, 1, "binary"),
    "retinamnist": (5, 3, "multiclass"),
    "breastmnist": (2, 1, "binary"),
    "bloodmnist": (8, 3, "multiclass"),
    "tissuemnist": (8, 1, "multiclass"),
    "organamnist": (11, 1, "multiclass"),
    "organcmnist": (11, 1, "multiclass"),
    "organsmnist": (11, 1, "multiclass"),
}


def test_every_2d_flag_is_registered_with_its_facts():
    assert set(FACTS) <= set(list_datasets())
    for flag, (k, ch, task) in FACTS.items():
        info = mm.INFO[flag]
        assert (len(info.class_names), info.n_channels, info.task) == (k, ch, task)
        assert set(info.md5) == {28, 64, 128, 224}
        entry = DATASETS.entry(flag)
        assert f"{k} classes" in entry.help and info.modality in entry.help
    assert mm.INFO["breastmnist"].class_names == ("malignant", "normal, benign")
    assert mm.INFO["pneumoniamnist"].class_names == ("normal", "pneumonia")
    assert mm.INFO["octmnist"].class_names[0] == "choroidal neovascularization"
    assert mm.INFO["organamnist"].class_names[6] == "liver"
    assert mm.INFO["pathmnist"].url(224) == (
        "https://zenodo.org/records/10519652/files/pathmnist_224.npz?download=1"
    )
    assert mm.INFO["chestmnist"].file_name(28) == "chestmnist.npz"


@pytest.mark.parametrize("flag", list(FACTS))
def test_every_flag_reads_its_official_layout(tmp_path, flag):
    arrays = make_npz(tmp_path / f"{flag}.npz", flag)
    ds = mm.load_medmnist_npz(tmp_path / f"{flag}.npz")
    k, ch, task = FACTS[flag]
    assert len(ds) == 13 and ds.task == task and ds.num_classes == k
    assert ds.splits == ["test", "train", "val"]
    assert ds.image(0).shape == ((28, 28) if ch == 1 else (28, 28, 3))
    np.testing.assert_array_equal(ds.image(7), arrays["val_images"][1])
    test = ds.split("test")
    labels = arrays["test_labels"]
    want = labels if task == "multilabel" else labels[:, 0]
    np.testing.assert_array_equal(test.labels, want)
    np.testing.assert_array_equal(test.image(3), arrays["test_images"][3])


def test_pathmnist_keeps_its_centre_shift_as_domain(tmp_path):
    make_npz(tmp_path / "pathmnist.npz", "pathmnist")
    ds = mm.load_medmnist_npz(tmp_path / "pathmnist.npz")
    assert set(ds.split("test").meta("domain")) == {"CRC-VAL-HE-7K"}
    assert set(ds.split("train").meta("domain")) == {"NCT-CRC-HE-100K"}


def test_load_medmnist_reads_root_size_and_split(tmp_path):
    make_npz(tmp_path / "dermamnist_64.npz", "dermamnist", size=64)
    ds = mm.load_medmnist("dermamnist", size=64, root=tmp_path, split="test")
    assert ds.name == "dermamnist_64" and len(ds) == 4 and ds.splits == ["test"]
    assert ds.image(0).shape == (64, 64, 3) and ds.modality == "dermoscopy"
    both = DATASETS.get("dermamnist")(size=64, root=tmp_path, split=["train", "val"])
    assert len(both) == 9 and "dermamnist_64.npz[val #0]" in both.describe(6)


def test_data_dir_env_is_the_default_root(tmp_path, monkeypatch):
    make_npz(tmp_path / "bloodmnist.npz", "bloodmnist")
    monkeypatch.setenv("CLINADAPT_DATA_DIR", str(tmp_path))
    assert len(DATASETS.get("bloodmnist")()) == 13


def test_offline_fails_at_once_naming_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINADAPT_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        mm.load_medmnist("pneumoniamnist", size=128, root=tmp_path)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "pneumoniamnist_128.npz" in msg and str(tmp_path) in msg
    assert "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz" in msg


def test_download_false_fails_without_probing(tmp_path, monkeypatch):
    monkeypatch.setattr(mm, "is_online", lambda: pytest.fail("probed the network"))
    with pytest.raises(DataError, match=r"octmnist\.npz.*download=False"):
        mm.load_medmnist("octmnist", root=tmp_path, download=False)


def test_online_path_downloads_to_root(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest, md5):
        calls.append((url, dest, md5))
        make_npz(dest, "breastmnist")

    monkeypatch.setattr(mm, "is_online", lambda: True)
    monkeypatch.setattr(mm, "_download", fake_download)
    ds = mm.load_medmnist("breastmnist", root=tmp_path / "cache")
    assert len(ds) == 13
    assert calls == [
        (
            mm.INFO["breastmnist"].url(28),
            tmp_path / "cache" / "breastmnist.npz",
            mm.INFO["breastmnist"].md5[28],
        )
    ]


def test_download_checks_md5_and_renames_atomically(tmp_path):
    src = tmp_path / "src.npz"
    make_npz(src, "retinamnist")
    url = src.as_uri()
    good = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "root" / "retinamnist.npz"
    mm._download(url, dest, good)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["retinamnist.npz"]
    bad = tmp_path / "root2" / "retinamnist.npz"
    with pytest.raises(DataError, match="MD5"):
        mm._download(url, bad, "0" * 32)
    assert list(bad.parent.iterdir()) == []


def test_offline_env_makes_is_online_false(monkeypatch):
    monkeypatch.setenv("CLINADAPT_OFFLINE", "1")
    assert mm.is_online() is False


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"val_labels": None}, r"missing keys \['val_labels'\]"),
        ({"train_labels": np.zeros((5, 1), np.uint8)}, r"6 train_images but 5 train_labels"),
        (
            {"test_images": np.zeros((4, 28, 28), np.float32)},
            r"test_images are float32, expected uint8",
        ),
        (
            {"val_labels": np.array([[0], [2], [1]], np.uint8)},
            r"val_labels\[1\] = 2 is outside the 2 classes",
        ),
        (
            {"train_labels": np.zeros((6, 1), np.float64)},
            r"train_labels are float64, expected integers",
        ),
        (
            {"test_images": np.zeros((4, 28, 28, 3), np.uint8)},
            r"test_images have shape \(4, 28, 28, 3\)",
        ),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path, override, pattern):
    path = tmp_path / "pneumoniamnist.npz"
    make_npz(path, "pneumoniamnist", **override)
    with pytest.raises(DataError, match=pattern) as err:
        mm.load_medmnist_npz(path)
    assert str(path) in str(err.value)


def test_multilabel_values_must_be_binary(tmp_path):
    path = tmp_path / "chestmnist.npz"
    labels = np.zeros((3, 14), np.uint8)
    labels[2, 5] = 3
    make_npz(path, "chestmnist", val_labels=labels)
    with pytest.raises(DataError, match=r"val_labels row 2.*0/1"):
        mm.load_medmnist_npz(path)


def test_unknown_flag_and_size(tmp_path):
    with pytest.raises(DataError, match=r"unknown MedMNIST flag 'foomnist'.*pathmnist"):
        mm.load_medmnist("foomnist", root=tmp_path)
    with pytest.raises(DataError, match="unsupported MedMNIST size 32"):
        mm.load_medmnist("pathmnist", size=32, root=tmp_path)


def test_flag_inference_and_size_checks(tmp_path):
    odd = tmp_path / "mydata.npz"
    make_npz(odd, "octmnist")
    with pytest.raises(DataError, match=r"mydata\.npz: cannot tell the MedMNIST flag"):
        mm.load_medmnist_npz(odd)
    assert mm.load_medmnist_npz(odd, flag="octmnist").task == "multiclass"
    wrong_size = tmp_path / "octmnist_64.npz"
    make_npz(wrong_size, "octmnist", size=28)
    with pytest.raises(
        DataError, match=r"octmnist_64\.npz: train_images are 28x28 but the file is for size 64"
    ):
        mm.load_medmnist_npz(wrong_size)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        mm.load_medmnist_npz(odd, flag="octmnist", split="dev")


def test_corrupt_npz_names_the_file(tmp_path):
    path = tmp_path / "bloodmnist.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match=r"bloodmnist\.npz: not a readable \.npz"):
        mm.load_medmnist_npz(path)
