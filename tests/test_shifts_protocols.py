"""Shift protocols: leave-one-domain-out, corruption, prevalence; and the registry listing."""

import numpy as np
import pytest

from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts import SHIFTS, apply_shift, corrupt, resample_to_prevalence
from clinadapt.shifts.corruption import parse_set_name


def test_registry_lists_every_protocol():
    assert {"none", "domain", "lodo", "corruption", "prevalence"} <= set(SHIFTS.names())


def test_lodo_holds_out_one_domain(small_shift):
    split = apply_shift(small_shift, "lodo", holdout="site-c")
    assert set(split.train.meta("domain")) == {"site-a", "site-b", "site-d"}
    assert set(split.train.meta("split")) == {"train"}
    assert split.in_domain == ["site-a", "site-b", "site-d"]
    assert len(split.tests["site-c"]) == len(small_shift.where(domain="site-c"))
    assert set(split.tests["site-a"].meta("split")) == {"test"}
    assert not set(split.tests["site-c"].meta("patient_id")) & set(split.train.meta("patient_id"))
    # a sweep over holdouts covers every domain once
    held = {
        apply_shift(small_shift, "lodo", holdout=d).options["holdout"] for d in small_shift.domains
    }
    assert held == set(small_shift.domains)
    assert apply_shift(small_shift, "lodo").options["holdout"] == "site-a"
    with pytest.raises(ConfigError, match="site-z"):
        apply_shift(small_shift, "lodo", holdout="site-z")
    with pytest.raises(DataError, match="at least two"):
        apply_shift(small_shift.where(domain="site-a"), "lodo")


def test_corruption_protocol_tests_clean_and_each_pair(small_shift):
    split = apply_shift(small_shift, "corruption", corruptions=["jpeg", "blur"], severities=[2, 5])
    assert list(split.tests) == ["clean", "jpeg@2", "jpeg@5", "blur@2", "blur@5"]
    assert split.in_domain == ["clean"]
    clean = small_shift.split("test")
    assert split.tests["clean"].fingerprint() == clean.fingerprint()
    assert set(split.train.meta("split")) == {"train"}
    view = split.tests["jpeg@5"]
    i = 4
    expected = corrupt(clean.image(i), "jpeg", 5, seed=0, position=int(clean.index[i]))
    assert np.array_equal(view.image(i), expected)
    assert np.array_equal(view.labels, clean.labels)
    assert parse_set_name("jpeg@5") == ("jpeg", 5) and parse_set_name("site-a") is None
    # the record says what each severity is and where its level comes from
    opts = split.describe()["options"]
    assert opts["levels"] == {"jpeg": {"2": 30, "5": 7}, "blur": {"2": 1.1, "5": 2.0}}
    assert opts["calibration"]["jpeg"].startswith("MedMNIST-C")
    # defaults: every corruption of the modality, severities 1..5
    full = apply_shift(small_shift, "corruption")
    assert len(full.tests) == 1 + 7 * 5
    # a source restriction trains and tests on those domains only
    only_b = apply_shift(
        small_shift, "corruption", corruptions="blur", severities=1, source="site-b"
    )
    assert (
        set(only_b.train.meta("domain")) == set(only_b.tests["blur@1"].meta("domain")) == {"site-b"}
    )
    with pytest.raises(ConfigError, match="severities"):
        apply_shift(small_shift, "corruption", severities=[0, 6])
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        apply_shift(small_shift, "corruption", corruptions=["fog"])


def _labelled(counts):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    n = len(labels)
    return ClinicalDataset(
        "toy",
        ArraySource(np.zeros((n, 4, 4), np.uint8)),
        labels,
        ["a", "b", "c"],
        metadata={"split": np.full(n, "test")},
    )


def test_prevalence_resampling_without_replacement():
    ds = _labelled([50, 30, 20])
    out = resample_to_prevalence(ds, [0.2, 0.3, 0.5], seed=1)
    # the rarest needed class bounds the size: 20 / 0.5 = 40 images
    assert len(out) == 40
    assert np.bincount(out.labels, minlength=3).tolist() == [8, 12, 20]
    assert len(set(out.index.tolist())) == 40  # no image twice
    again = resample_to_prevalence(ds, {"a": 0.2, "b": 0.3, "c": 0.5}, seed=1)
    assert np.array_equal(out.index, again.index)
    assert not np.array_equal(out.index, resample_to_prevalence(ds, [0.2, 0.3, 0.5], seed=2).index)
    # largest remainder: 0.34/0.33/0.33 of 10 is 4/3/3
    assert np.bincount(resample_to_prevalence(ds, [0.34, 0.33, 0.33], size=10).labels).tolist() == [
        4,
        3,
        3,
    ]
    with pytest.raises(DataError, match="needs 60 images of 'c' but only 20"):
        resample_to_prevalence(ds, [0.2, 0.2, 0.6], size=100)


def test_prevalence_with_replacement_and_errors():
    ds = _labelled([50, 30, 2])
    out = resample_to_prevalence(ds, [0.0, 0.2, 0.8], size=100, replace=True, seed=0)
    assert np.bincount(out.labels, minlength=3).tolist() == [0, 20, 80]
    assert len(set(out.index[out.labels == 2].tolist())) <= 2
    assert len(resample_to_prevalence(ds, [0.5, 0.5, 0.0], replace=True)) == len(ds)
    with pytest.raises(ConfigError, match="sum to 1"):
        resample_to_prevalence(ds, [0.5, 0.6, 0.0])
    with pytest.raises(ConfigError, match="3 proportions"):
        resample_to_prevalence(ds, [0.5, 0.5])
    with pytest.raises(ConfigError, match="unknown class"):
        resample_to_prevalence(ds, {"z": 1.0})
    empty = _labelled([5, 5, 0])
    with pytest.raises(DataError, match=r"no images of class\(es\) \['c'\]"):
        resample_to_prevalence(empty, [0.5, 0.0, 0.5], replace=True)


def test_prevalence_protocol(small_shift):
    split = apply_shift(small_shift, "prevalence", prevalence=[0.7, 0.1, 0.1, 0.1])
    assert list(split.tests) == ["test", "prevalence"]
    counts = np.bincount(split.tests["prevalence"].labels, minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), [0.7, 0.1, 0.1, 0.1], atol=0.02)
    assert set(split.tests["prevalence"].index) <= set(split.tests["test"].index)
    with pytest.raises(ConfigError, match=r"shift_options\.prevalence"):
        apply_shift(small_shift, "prevalence")


def test_prevalence_protocol_restricted_to_source_domains():
    from clinadapt.data.synthetic import make_clinical_shift

    two_sites = make_clinical_shift(patients_per_site=100, sites=["site-a", "site-b"])
    split = apply_shift(
        two_sites, "prevalence", prevalence=[0.4, 0.2, 0.2, 0.2], source="site-a", replace=True
    )
    for part in (split.train, split.tests["test"], split.tests["prevalence"]):
        assert set(part.meta("domain")) == {"site-a"}
    assert set(split.train.meta("split")) == {"train"}
    assert split.describe()["options"]["source"] == "site-a"
