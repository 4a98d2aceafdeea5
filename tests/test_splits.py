"""Splits the toolkit makes itself: by patient, within each site, stratified by label, recorded."""

import numpy as np
import pytest

from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.shifts import apply_shift, ensure_splits
from clinadapt.shifts.base import split_counts


def _sites(patients=(3, 10, 4), images=2, seed=0):
    rng = np.random.default_rng(seed)
    pid, dom, lab = [], [], []
    for s, n in enumerate(patients):
        for p in range(n):
            y = p % 2  # half the patients of each site are positive
            for _ in range(images):
                pid.append(f"s{s}-p{p}")
                dom.append(f"site-{s}")
                lab.append(y)
    n = len(pid)
    return ClinicalDataset(
        "sites",
        ArraySource(rng.integers(0, 255, (n, 4, 4)).astype(np.uint8)),
        np.array(lab),
        ["neg", "pos"],
        metadata={"patient_id": np.array(pid), "domain": np.array(dom)},
    )


def test_split_counts():
    assert split_counts(1, (0.6, 0.2, 0.2)) == (1, 0, 0)
    assert split_counts(2, (0.6, 0.2, 0.2)) == (1, 0, 1)
    assert split_counts(3, (0.6, 0.2, 0.2)) == (1, 1, 1)
    assert split_counts(10, (0.6, 0.2, 0.2)) == (6, 2, 2)
    assert split_counts(20, (0.6, 0.2, 0.2)) == (12, 4, 4)


@pytest.mark.parametrize("seed", range(12))
def test_every_site_gets_test_patients_and_labels_are_spread(seed):
    ds = _sites()
    out = ensure_splits(ds, seed=seed)
    split, pid, dom = out.meta("split"), out.meta("patient_id"), out.meta("domain")
    for p in np.unique(pid):  # patient-level
        assert len(set(split[pid == p])) == 1
    for site, n in zip(("site-0", "site-1", "site-2"), (3, 10, 4), strict=True):
        per = {s: set(pid[(dom == site) & (split == s)]) for s in ("train", "val", "test")}
        assert tuple(len(per[s]) for s in ("train", "val", "test")) == split_counts(
            n, (0.6, 0.2, 0.2)
        )
    # the 10-patient site (5 negative, 5 positive): each split holds both labels evenly
    site1 = (dom == "site-1") & (np.arange(len(ds)) % 2 == 0)  # one image per patient
    for s in ("train", "val", "test"):
        ys = out.labels[site1 & (split == s)]
        assert abs(int((ys == 0).sum()) - int((ys == 1).sum())) <= 1, (s, ys)
    # recorded, and the same seed gives the same split
    assert "within each domain" in out.notes[-1] and f"seed {seed}" in out.notes[-1]
    assert np.array_equal(ensure_splits(ds, seed=seed).meta("split"), split)


def test_a_manifest_without_split_runs_the_domain_shift_on_every_site(tmp_path):
    """The shift's record says how the split was made."""
    split = apply_shift(_sites(), "domain", seed=3, source="site-0")
    assert set(split.tests) == {"site-0", "site-1", "site-2"}
    assert len(split.tests["site-0"]) == 2  # its one test patient
    assert "stratified by label, seed 3" in split.describe()["notes"][-1]
