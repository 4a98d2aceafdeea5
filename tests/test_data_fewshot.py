"""Few-shot sampling: counts, determinism, nesting, patient-disjointness, exclusion, errors."""

from __future__ import annotations

import numpy as np
import pytest

from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.data.fewshot import few_shot_indices, sample_few_shot
from clinadapt.errors import DataError


def make_ds(labels, patients=None, task="multiclass", names=None) -> ClinicalDataset:
    labels = np.asarray(labels)
    n = len(labels)
    k = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
    imgs = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    meta = {} if patients is None else {"patient_id": np.asarray(patients)}
    return ClinicalDataset(
        name="toy",
        source=ArraySource(imgs),
        labels=labels,
        class_names=names or [f"c{i}" for i in range(k)],
        task=task,
        metadata=meta,
    )


@pytest.fixture
def ds():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [60, 40, 50])
    patients = np.array([f"p{i // 2}" for i in range(150)])[rng.permutation(150)]
    return make_ds(labels, patients)


def test_k_images_per_class_and_deterministic(ds):
    for k in (1, 3, 5):
        sub = sample_few_shot(ds, k, seed=4)
        assert sub.class_counts().tolist() == [k, k, k] and len(sub) == 3 * k
        np.testing.assert_array_equal(sub.index, sample_few_shot(ds, k, seed=4).index)
    assert not np.array_equal(few_shot_indices(ds, 5, seed=0), few_shot_indices(ds, 5, seed=1))
    sub = sample_few_shot(ds, 2, seed=0)
    np.testing.assert_array_equal(sub.image(0), ds.image(int(sub.index[0])))
    assert sub.name == "toy/2-shot-seed0"


def test_nested_across_shots(ds):
    for seed in range(5):
        prev: set[int] = set()
        for k in (1, 2, 4, 8):
            cur = set(few_shot_indices(ds, k, seed).tolist())
            assert prev <= cur
            prev = cur


def test_one_image_per_patient(ds):
    for seed in range(5):
        sub = sample_few_shot(ds, 6, seed)
        pids = sub.meta("patient_id")
        assert len(set(pids)) == len(pids) == 18


def test_exclude_patients_keeps_support_and_query_apart(ds):
    query = set(ds.meta("patient_id")[:20].tolist())
    for k in (1, 2, 3):
        sub = sample_few_shot(ds, k, seed=2, exclude_patients=query)
        assert not set(sub.meta("patient_id")) & query
        assert sub.class_counts().tolist() == [k] * 3
    small = set(few_shot_indices(ds, 1, 2, exclude_patients=query).tolist())
    assert small <= set(few_shot_indices(ds, 3, 2, exclude_patients=query).tolist())


def test_too_few_images_or_patients_names_the_class():
    ds = make_ds([0, 0, 0, 1, 1], names=["normal", "rare"])
    assert len(sample_few_shot(ds, 2)) == 4
    with pytest.raises(DataError, match=r"class 'rare' has 2 images; 3-shot sampling needs 3"):
        sample_few_shot(ds, 3)
    same_patient = make_ds([0, 0, 0, 1, 1], ["a", "b", "c", "d", "d"], names=["normal", "rare"])
    with pytest.raises(DataError, match=r"class 'rare' has 2 images, from 1 distinct patient"):
        sample_few_shot(same_patient, 2)
    with pytest.raises(
        DataError, match=r"class 'normal' has 3 images, 1 after excluding 2 patient"
    ):
        sample_few_shot(same_patient, 2, exclude_patients=["a", "b"])


def test_unknown_patient_ids_count_as_distinct():
    ds = make_ds([0, 0, 1, 1], ["", "", "", ""])
    assert len(sample_few_shot(ds, 2)) == 4


def test_multilabel_takes_k_positives_per_class():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 4)) < 0.3).astype(int)
    ds = make_ds(labels, [f"p{i}" for i in range(60)], task="multilabel")
    for k in (1, 3):
        sub = sample_few_shot(ds, k, seed=3)
        assert len(sub) == 4 * k and (sub.class_counts() >= k).all()
    assert set(few_shot_indices(ds, 1, 3)) <= set(few_shot_indices(ds, 3, 3))


def test_bad_arguments():
    ds = make_ds([0, 1, 0, 1])
    with pytest.raises(DataError, match="shots must be a positive integer"):
        sample_few_shot(ds, 0)
    with pytest.raises(DataError, match="exclude_patients needs 'patient_id' metadata"):
        sample_few_shot(ds, 1, exclude_patients=["p1"])
    assert len(sample_few_shot(ds, 1, exclude_patients=[])) == 2
