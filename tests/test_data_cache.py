"""A registered dataset is built once per process, and no caller can change what others get."""

import numpy as np
import pytest

from clinadapt.data import DATASETS, load_dataset
from clinadapt.data.cache import MAX_ENTRIES, clear_dataset_cache


def test_a_registered_dataset_is_built_once_per_options():
    clear_dataset_cache()
    a = load_dataset("clinical-shift", patients_per_site=5)
    b = load_dataset("clinical-shift", patients_per_site=5)
    # the same pixels in memory (not generated again), the same data
    assert np.shares_memory(a.source.array, b.source.array)
    assert a.fingerprint() == b.fingerprint()
    c = load_dataset("clinical-shift", patients_per_site=5, seed=1)
    assert not np.shares_memory(a.source.array, c.source.array)
    assert a.fingerprint() != c.fingerprint()
    seg = load_dataset("clinical-shift-seg", patients_per_site=5)
    again = load_dataset("clinical-shift-seg", patients_per_site=5)
    assert np.shares_memory(seg.masks.array, again.masks.array)
    for i in range(MAX_ENTRIES):  # the least recently used entry makes room
        load_dataset("clinical-shift", patients_per_site=5, seed=10 + i)
    d = load_dataset("clinical-shift", patients_per_site=5)
    assert not np.shares_memory(a.source.array, d.source.array)
    assert d.fingerprint() == a.fingerprint()


def test_callers_cannot_change_what_the_next_load_returns():
    clear_dataset_cache()
    first = load_dataset("clinical-shift", patients_per_site=5)
    pristine = first.fingerprint()
    labels, split = first.labels.copy(), first.metadata["split"].copy()
    # every way a caller might change its copy
    first.labels[:] = 0
    first.metadata["split"][:] = "train"
    first.metadata["extra"] = np.zeros(len(first))
    first.class_names.append("other")
    first.index[:] = 0
    first.source.origin = "changed"
    pixels = first.image(0).copy()
    first.image(0)[:] = 0  # an image is the caller's own copy
    with pytest.raises(ValueError, match="read-only"):
        first.source.array[0, 0, 0] = 1  # the shared pixels cannot be written
    second = load_dataset("clinical-shift", patients_per_site=5)
    assert second.fingerprint() == pristine
    np.testing.assert_array_equal(second.labels, labels)
    np.testing.assert_array_equal(second.metadata["split"], split)
    assert "extra" not in second.metadata and second.num_classes == 4
    assert second.source.origin != "changed"
    np.testing.assert_array_equal(second.image(0), pixels)
    seg = load_dataset("clinical-shift-seg", patients_per_site=5)
    seg.areas[:] = 0
    seg.spacing[:] = 9.0
    seg_again = load_dataset("clinical-shift-seg", patients_per_site=5)
    assert seg_again.areas.sum() > 0 and (seg_again.spacing != 9.0).all()
    mask = seg_again.mask(0).copy()
    seg_again.mask(0)[:] = 0
    np.testing.assert_array_equal(
        load_dataset("clinical-shift-seg", patients_per_site=5).mask(0), mask
    )
    with pytest.raises(ValueError, match="read-only"):
        seg_again.masks.array[0, 0, 0] = 1


def test_datasets_read_from_files_are_read_again(tmp_path, monkeypatch):
    """Only generated datasets are kept: a MedMNIST name reads the file its options point to."""
    rng = np.random.default_rng(0)
    for root, n in ((tmp_path / "a", 4), (tmp_path / "b", 6)):
        root.mkdir()
        arrays = {}
        for split in ("train", "val", "test"):
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None].astype(np.uint8)
        np.savez_compressed(root / "pneumoniamnist.npz", **arrays)
    monkeypatch.setenv("CLINADAPT_OFFLINE", "1")
    monkeypatch.setenv("CLINADAPT_DATA_DIR", str(tmp_path / "a"))
    assert len(load_dataset("pneumoniamnist")) == 12
    monkeypatch.setenv("CLINADAPT_DATA_DIR", str(tmp_path / "b"))
    assert len(load_dataset("pneumoniamnist")) == 18
    assert "generated" in DATASETS.entry("clinical-shift").tags
    assert "generated" not in DATASETS.entry("pneumoniamnist").tags
