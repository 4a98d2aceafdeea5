import numpy as np
import pytest

from clinadapt import load_dataset
from clinadapt.data.synthetic import CLASS_NAMES, SITES, make_clinical_shift
from clinadapt.errors import DataError


def test_deterministic_and_seeded():
    a = make_clinical_shift(seed=3, patients_per_site=20)
    b = make_clinical_shift(seed=3, patients_per_site=20)
    c = make_clinical_shift(seed=4, patients_per_site=20)
    assert a.fingerprint() == b.fingerprint()
    assert np.array_equal(a.image(5), b.image(5))
    assert a.fingerprint() != c.fingerprint()


def test_structure_and_metadata():
    ds = load_dataset("clinical-shift", patients_per_site=30, size=48)
    assert ds.class_names == CLASS_NAMES
    assert ds.image(0).shape == (48, 48) and ds.image(0).dtype == np.uint8
    assert ds.domains == sorted(SITES)
    assert set(ds.splits) == {"train", "val", "test"}
    for key in ("domain", "scanner", "sex", "age_group", "patient_id"):
        assert ds.has_meta(key)
    # splits are per patient: no patient crosses a split
    pid, split = ds.meta("patient_id"), ds.meta("split")
    for p in np.unique(pid):
        assert len(set(split[pid == p])) == 1
    # one scanner per site
    for d in ds.domains:
        assert len(set(ds.where(domain=d).meta("scanner"))) == 1


def test_sites_differ_in_acquisition():
    ds = make_clinical_shift(patients_per_site=40)
    stats = {}
    for d in ds.domains:
        sub = ds.where(domain=d)
        imgs = np.stack([sub.image(i) for i in range(len(sub))]).astype(float)
        # high-frequency energy: noise raises it, blur lowers it
        hf = np.mean(np.abs(np.diff(imgs, axis=2)))
        # edge sharpness on 2x2 block means, where pixel noise is averaged away
        blocks = imgs.reshape(len(imgs), 32, 2, 32, 2).mean((2, 4))
        edges = np.mean(np.abs(np.diff(blocks, axis=2)))
        stats[d] = (imgs.mean(), imgs.std(), hf, edges)
    assert stats["site-b"][1] < stats["site-a"][1]  # flatter contrast
    assert stats["site-b"][2] > stats["site-a"][2]  # noisier
    assert stats["site-c"][3] < 0.92 * stats["site-a"][3]  # blurred
    assert stats["site-d"][0] > stats["site-a"][0]  # brighter


def test_one_site_and_bad_arguments():
    ds = make_clinical_shift(patients_per_site=10, sites=["site-c"])
    assert ds.domains == ["site-c"]
    with pytest.raises(DataError, match="unknown site"):
        make_clinical_shift(sites=["site-z"])
    with pytest.raises(DataError, match="size"):
        make_clinical_shift(size=8)
    with pytest.raises(DataError, match="split_fractions"):
        make_clinical_shift(split_fractions=(0.5, 0.5, 0.5))


def test_site_stream_independent_of_other_sites():
    full = make_clinical_shift(patients_per_site=10)
    alone = make_clinical_shift(patients_per_site=10, sites=["site-b"])
    sub = full.where(domain="site-b")
    assert np.array_equal(sub.image(0), alone.image(0))
    assert len(sub) == len(alone)
