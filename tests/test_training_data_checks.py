"""What a run refuses or says about its training data before a number is reported."""

import numpy as np
import pytest
from PIL import Image

from clinadapt.config import RunConfig
from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.errors import DataError
from clinadapt.runner import run_experiment
from clinadapt.shifts import apply_shift
from filewriters import write_csv

QUICK = {"epochs": 1}


def _manifest(tmp_path, label_of, split_of=None, patients_per_site=12):
    """PNG images of the built-in data with a CSV manifest; labels and splits chosen per row."""
    ds = make_clinical_shift(seed=0, patients_per_site=patients_per_site, size=32)
    rows = []
    for i in range(len(ds)):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(ds.image(i)).save(path)
        row = {
            "path": str(path),
            "label": label_of(ds, i),
            "site": ds.meta("domain")[i],
            "patient_id": ds.meta("patient_id")[i],
        }
        if split_of is not None:
            row["split"] = split_of(ds, i)
        rows.append(row)
    return str(write_csv(tmp_path / "manifest.csv", rows))


def test_one_class_training_data_is_refused_before_training(tmp_path):
    """Site A holds only normals: a classifier trained there would score a perfect balanced
    accuracy on its own test set; the run stops at once, naming the class."""

    def label(ds, i):
        return "normal" if ds.meta("domain")[i] == "site-a" else ds.class_names[ds.labels[i]]

    cfg = RunConfig(
        data=_manifest(tmp_path, label),
        shift_options={"source": "site-a"},
        method="finetune",
        method_options=QUICK,
        out_dir=str(tmp_path / "runs"),
    )
    with pytest.raises(DataError, match=r"only the class\(es\) \['normal'\]"):
        run_experiment(cfg)
    assert not (tmp_path / "runs" / "cache").exists()  # nothing was trained


def test_missing_validation_is_held_out_of_train_and_recorded(tmp_path):
    """Data with train and test splits only: 20% of the training patients become validation,
    patient-disjoint, and the record says so (no silent 'no selection, threshold 0.5')."""

    def split(ds, i):
        return "test" if ds.meta("split")[i] == "test" else "train"

    data = _manifest(tmp_path, lambda ds, i: ds.class_names[ds.labels[i]], split)
    from clinadapt.data import load_dataset

    s = apply_shift(load_dataset(data), "domain", seed=0, source="site-a")
    assert s.val is not None and len(s.val) > 0
    train_p, val_p = set(s.train.meta("patient_id")), set(s.val.meta("patient_id"))
    assert not train_p & val_p and set(s.val.meta("domain")) == {"site-a"}
    record = run_experiment(
        RunConfig(data=data, method_options=QUICK, out_dir=str(tmp_path / "runs"))
    )
    assert "held out as validation" in record["shift"]["notes"][-1]
    assert record["shift"]["val"] == len(s.val)
    assert record["training"]["monitor"] == "balanced_accuracy"
    assert "selection" not in record["training"]  # chosen on the held-out validation


def test_too_little_data_for_validation_says_so():
    pid = np.array(["p1", "p1", "p2", "p3", "p4", "p5"])
    ds = ClinicalDataset(
        "few",
        ArraySource(np.zeros((6, 4, 4), np.uint8)),
        np.array([0, 0, 1, 0, 1, 0]),
        ["a", "b"],
        metadata={"patient_id": pid, "split": np.array(["train"] * 4 + ["test"] * 2)},
    )
    split = apply_shift(ds, "none")
    assert split.val is None and len(split.train) == 4
    assert "no validation data and only 3 training patients" in split.describe()["notes"][-1]
