import numpy as np
import pytest

from clinadapt import load_dataset
from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.data.synthetic import SITES
from clinadapt.data.synthetic_seg import FIELD_OF_VIEW_MM, make_clinical_shift_seg
from clinadapt.errors import DataError


def test_deterministic_registered_and_structured():
    a = load_dataset("clinical-shift-seg", seed=2, patients_per_site=10)
    b = make_clinical_shift_seg(seed=2, patients_per_site=10)
    c = make_clinical_shift_seg(seed=3, patients_per_site=10)
    assert isinstance(a, SegmentationDataset) and a.task == "segmentation"
    assert a.fingerprint() == b.fingerprint() and a.fingerprint() != c.fingerprint()
    assert np.array_equal(a.mask(4), b.mask(4))
    assert a.class_names == ["lung", "lesion"] and a.modality == "xray"
    assert a.domains == sorted(SITES) and set(a.splits) == {"train", "val", "test"}
    for key in ("domain", "scanner", "sex", "age_group", "patient_id"):
        assert a.has_meta(key)
    pid, split = a.meta("patient_id"), a.meta("split")
    for p in np.unique(pid):
        assert len(set(split[pid == p])) == 1
    img, mask = a.pair(0)
    assert img.shape == mask.shape == (64, 64) and img.dtype == mask.dtype == np.uint8
    assert np.allclose(a.spacing, FIELD_OF_VIEW_MM / 64)
    # every image shows both lungs; some have no lesion
    assert a.labels[:, 0].all() and 0 < a.labels[:, 1].mean() < 1
    for i in range(len(a)):
        assert a.areas[i].tolist() == [int((a.mask(i) == k).sum()) for k in (1, 2)]


def test_binary_variant_and_size():
    ds = make_clinical_shift_seg(patients_per_site=8, classes=["lesion"], size=48)
    assert ds.binary and ds.mask(0).max() <= 1 and ds.image(0).shape == (48, 48)
    assert ds.empty().any() and not ds.empty().all()
    with pytest.raises(DataError, match="classes must be drawn"):
        make_clinical_shift_seg(classes=["heart"])
    with pytest.raises(DataError, match="unknown site"):
        make_clinical_shift_seg(sites=["site-q"])


def test_masks_mark_what_the_pixels_show():
    ds = make_clinical_shift_seg(patients_per_site=20, sites=["site-a"])
    lung, lesion, body = [], [], []
    for i in range(len(ds)):
        img, m = ds.pair(i)
        img = img.astype(float)
        lung.append(img[m == 1].mean())
        body.append(img[(m == 0)[:, :]][img[m == 0] > 60].mean())
        if (m == 2).sum() >= 20:
            lesion.append(img[m == 2].mean())
    # lungs are darker than the body around them, lesions brighter than the lung they sit in
    assert np.mean(lung) < np.mean(body) - 20
    assert np.mean(lesion) > np.mean(lung) + 10


def test_same_masks_different_pixels_across_sites():
    ds = make_clinical_shift_seg(patients_per_site=30)
    stats = {}
    for d in ds.domains:
        sub = ds.where(domain=d)
        imgs = np.stack([sub.image(i) for i in range(len(sub))]).astype(float)
        masks = np.stack([sub.mask(i) for i in range(len(sub))])
        stats[d] = (imgs.mean(), imgs.std(), (masks == 1).mean())
    lung_frac = [v[2] for v in stats.values()]
    assert max(lung_frac) - min(lung_frac) < 0.03  # the anatomy does not depend on the site
    assert stats["site-b"][1] < 0.8 * stats["site-a"][1]  # flatter contrast
    assert stats["site-d"][0] > stats["site-a"][0] + 10  # brighter
