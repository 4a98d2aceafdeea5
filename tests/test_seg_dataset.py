"""The segmentation dataset type: masks follow every view, labels are class presence, errors name the problem."""

import numpy as np
import pytest

from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.data.segmentation import (
    ArrayMasks,
    SegmentationDataset,
    class_areas,
    label_lookup,
    to_label_map,
)
from clinadapt.errors import DataError
from clinadapt.methods.tta.protocol import concat_streams
from clinadapt.shifts import apply_shift, corrupted, ensure_splits


def _tiny(n=6, classes=("organ", "lesion"), spacing=None, meta=True):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (n, 8, 10), dtype=np.uint8)
    masks = np.zeros((n, 8, 10), dtype=np.uint8)
    for i in range(n):
        masks[i, : i + 1, :3] = 1
        if i % 2:
            masks[i, 5:, 5 + i % 3 :] = len(classes)
    md = {
        "domain": np.array(["a", "a", "a", "b", "b", "b"][:n]),
        "patient_id": np.array([f"p{i // 2}" for i in range(n)]),
        "split": np.array(["train", "val", "test", "train", "test", "test"][:n]),
    }
    return SegmentationDataset(
        name="tiny",
        source=ArraySource(imgs),
        labels=None,
        class_names=list(classes),
        metadata=md if meta else {},
        masks=ArrayMasks(masks, len(classes)),
        areas=np.stack([class_areas(m, len(classes)) for m in masks]),
        spacing=spacing,
    )


def test_labels_are_presence_and_views_keep_masks_aligned():
    ds = _tiny()
    assert ds.task == "segmentation" and ds.num_classes == 2 and not ds.binary
    assert ds.labels.tolist() == [[1, 0], [1, 1], [1, 0], [1, 1], [1, 0], [1, 1]]
    assert ds.areas[1].tolist() == [6, 3 * 4]  # rows 0..1 x 3 cols; rows 5..7 x cols 6..9
    sub = ds.where(domain="b")
    assert isinstance(sub, SegmentationDataset) and len(sub) == 3
    for j, i in enumerate([3, 4, 5]):
        assert np.array_equal(sub.mask(j), ds.mask(i))
        assert np.array_equal(sub.image(j), ds.image(i))
        assert sub.areas[j].tolist() == ds.areas[i].tolist()
    picked = ds.subset([5, 0])
    assert np.array_equal(picked.mask(0), ds.mask(5)) and picked.labels[1].tolist() == [1, 0]
    assert ds.split("test").meta("patient_id").tolist() == ["p1", "p2", "p2"]
    assert np.array_equal(ds.split("test").mask(0), ds.mask(2))
    # the unknown spacing is 1 mm, and says so
    assert ds.spacing.shape == (6, 2) and ds.spacing_origin == "assumed 1 mm (unknown)"
    assert ds.areas_mm2()[1].tolist() == [6.0, 12.0]
    assert ds.summary()["spacing_origin"] == "assumed 1 mm (unknown)"


def test_spacing_per_image_follows_views_and_counts_in_mm2():
    sp = np.array([[0.5, 0.5], [1, 2], [1, 1], [2, 2], [0.25, 0.5], [3, 1]])
    ds = _tiny(spacing=sp)
    assert ds.spacing_origin == "given"
    sub = ds.subset([3, 1])
    assert sub.spacing.tolist() == [[2, 2], [1, 2]]
    assert sub.areas_mm2()[1].tolist() == [6 * 2.0, 12 * 2.0]
    assert _tiny(spacing=np.array([0.7, 0.7])).spacing[4].tolist() == [0.7, 0.7]
    with pytest.raises(DataError, match="positive mm"):
        _tiny(spacing=np.array([0.0, 1.0]))


def test_fingerprint_covers_masks_and_spacing():
    a, b = _tiny(), _tiny()
    assert a.fingerprint() == b.fingerprint()
    c = _tiny(spacing=np.array([0.5, 0.5]))
    assert c.fingerprint() != a.fingerprint()
    m = a.masks.array.copy()
    m[0, 7, 9] = 2
    d = a.replace(
        masks=ArrayMasks(m, 2), areas=np.stack([class_areas(x, 2) for x in m]), labels=None
    )
    assert d.fingerprint() != a.fingerprint()


def test_shift_and_stream_helpers_keep_the_type():
    ds = _tiny(meta=False)
    split = ensure_splits(ds, seed=0)
    assert isinstance(split, SegmentationDataset) and split.has_meta("split")
    noisy = corrupted(ds, "gaussian-noise", 3)
    assert isinstance(noisy, SegmentationDataset)
    assert not np.array_equal(noisy.image(1), ds.image(1))
    assert np.array_equal(noisy.mask(1), ds.mask(1))  # photometric: masks unchanged
    tiny = _tiny()
    sets = apply_shift(tiny, "domain", source="a").tests
    whole = concat_streams([sets["a"], sets["b"]], "all")
    assert isinstance(whole, SegmentationDataset) and len(whole) == len(sets["a"]) + 3
    assert np.array_equal(whole.mask(len(sets["a"])), tiny.mask(3))
    assert whole.spacing.shape == (len(whole), 2)
    with pytest.raises(DataError, match="one dataset"):
        ClinicalDataset.concat([sets["a"], _tiny().where(domain="b")], "x")


def test_pair_names_both_files_on_size_mismatch():
    ds = _tiny()
    bad = ds.replace(source=ArraySource(np.zeros((6, 9, 10), np.uint8), origin="imgs"))
    with pytest.raises(DataError, match=r"imgs\[2\].*9x10.*masks\[2\] is 8x10"):
        bad.pair(2)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"class_names": ["organ"]}, "masks hold 2 classes"),
        ({"class_names": ["background", "lesion"]}, "leave 'background'"),
        ({"areas": np.zeros((6, 3))}, r"areas must be \(6, 2\)"),
        ({"masks": ArrayMasks(np.zeros((5, 8, 10), np.uint8), 2)}, "5 masks for 6 images"),
        ({"labels": np.ones((6, 2))}, "presence"),
        ({"masks": None}, "needs masks"),
    ],
)
def test_bad_construction(change, match):
    ds = _tiny()
    with pytest.raises(DataError, match=match):
        ds.replace(**change)


def test_array_masks_refuse_labels_beyond_the_classes():
    with pytest.raises(DataError, match=r"masks\[1\]: label 3 is outside 0..2"):
        ArrayMasks(np.array([[[0, 1]], [[3, 0]]]), 2)
    with pytest.raises(DataError, match="integer labels"):
        ArrayMasks(np.zeros((1, 2, 2), np.float32), 1)


def test_binary_masks_in_both_encodings():
    lut = label_lookup(None, ["lesion"], "x")
    assert to_label_map(np.array([[0, 255]], np.uint8), lut, ["lesion"], "m.png").tolist() == [
        [0, 1]
    ]
    assert to_label_map(np.array([[0, 1]]), lut, ["lesion"], "m.png").tolist() == [[0, 1]]
    assert to_label_map(np.array([[True, False]]), lut, ["lesion"], "m.png").tolist() == [[1, 0]]
    with pytest.raises(DataError, match=r"m\.png: not a binary mask.*\[0, 128, 255\]"):
        to_label_map(np.array([[0, 128, 255]]), lut, ["lesion"], "m.png")
    with pytest.raises(DataError, match="not a binary mask"):
        to_label_map(np.array([[0, 1, 255]]), lut, ["lesion"], "m.png")
    with pytest.raises(DataError, match="JPEG is lossy"):
        to_label_map(np.array([[0, 3, 255]]), lut, ["lesion"], "m.jpg")


def test_label_map_values_and_names():
    names = ["liver", "kidney"]
    lut = label_lookup({0: "background", 38: "liver", 75: "kidney"}, names, "x")
    raw = np.array([[0, 38], [75, 38]])
    assert to_label_map(raw, lut, names, "a.png").tolist() == [[0, 1], [2, 1]]
    with pytest.raises(
        DataError, match=r"a\.png: mask value\(s\) \[12\] are outside the label map"
    ):
        to_label_map(np.array([[0, 12]]), lut, names, "a.png")
    with pytest.raises(DataError, match="'spleen', which is not among the classes"):
        label_lookup({1: "spleen"}, names, "x")
    with pytest.raises(DataError, match="non-integer"):
        to_label_map(np.array([[0.0, 0.5]]), label_lookup(None, names, "x"), names, "s.npy")
    # identity without a label map: 0..C
    assert to_label_map(
        np.array([[2, 1]]), label_lookup(None, names, "x"), names, "b"
    ).tolist() == [[2, 1]]
    with pytest.raises(DataError, match=r"\[3\] are outside"):
        to_label_map(np.array([[3]]), label_lookup(None, names, "x"), names, "b")
