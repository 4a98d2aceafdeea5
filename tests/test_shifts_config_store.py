import json

import numpy as np
import pytest

from clinadapt.config import RunConfig, load_config, parse_assignment
from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts import apply_shift, ensure_splits
from clinadapt.store import list_records, read_record, write_arrays, write_record


def test_domain_shift_splits(small_shift):
    split = apply_shift(small_shift, "domain", source="site-b")
    assert split.in_domain == ["site-b"]
    assert set(split.train.meta("domain")) == {"site-b"}
    assert set(split.train.meta("split")) == {"train"}
    assert set(split.val.meta("split")) == {"val"}
    assert set(split.tests) == {"site-a", "site-b", "site-c", "site-d"}
    assert set(split.tests["site-b"].meta("split")) == {"test"}
    # unseen sites are tested on all their images
    assert len(split.tests["site-a"]) == len(small_shift.where(domain="site-a"))
    # held-out source patients never appear in training
    assert not set(split.tests["site-b"].meta("patient_id")) & set(split.train.meta("patient_id"))


def test_domain_shift_errors(small_shift):
    with pytest.raises(ConfigError, match="site-x"):
        apply_shift(small_shift, "domain", source="site-x")
    with pytest.raises(ConfigError, match="shift 'domain': unknown option 'bogus'"):
        apply_shift(small_shift, "domain", bogus=1)
    with pytest.raises(ConfigError, match="did you mean 'source'"):
        apply_shift(small_shift, "domain", sourc="site-a")
    bare = ClinicalDataset(
        "bare", ArraySource(np.zeros((4, 8, 8), np.uint8)), np.array([0, 1, 0, 1]), ["a", "b"]
    )
    with pytest.raises(DataError, match="'domain' metadata"):
        apply_shift(bare, "domain")


def test_ensure_splits_is_patient_level():
    n = 60
    pid = np.repeat(np.arange(20), 3).astype(str)
    ds = ClinicalDataset(
        "p",
        ArraySource(np.zeros((n, 8, 8), np.uint8)),
        np.arange(n) % 2,
        ["a", "b"],
        metadata={"patient_id": pid},
    )
    out = ensure_splits(ds, seed=1)
    for p in np.unique(pid):
        assert len(set(out.meta("split")[pid == p])) == 1
    counts = {s: np.sum(out.meta("split") == s) for s in ("train", "val", "test")}
    assert counts == {"train": 36, "val": 12, "test": 12}
    assert (
        apply_shift(ds, "none", seed=1).tests["test"].fingerprint()
        == out.split("test").fingerprint()
    )


def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-vit\nmethod: bn\nmethod_options:\n  prior: 0.5\n")
    cfg = load_config(path, seed=3, **{"method_options.prior": 0.25})
    assert (cfg.model, cfg.method, cfg.seed, cfg.method_options) == (
        "tiny-vit",
        "bn",
        3,
        {"prior": 0.25},
    )
    assert cfg.run_id() != load_config(path).run_id()
    assert cfg.run_id() == load_config(path, seed=3, **{"method_options.prior": 0.25}).run_id()
    # where results go does not change what the experiment is
    assert cfg.run_id() == cfg.model_copy(update={"out_dir": "elsewhere"}).run_id()
    (tmp_path / "bad.yaml").write_text("modle: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*modle"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    assert parse_assignment("method_options.lr=1e-3") == ("method_options.lr", 1e-3)
    assert parse_assignment("shift_options.source=[site-a, site-b]") == (
        "shift_options.source",
        ["site-a", "site-b"],
    )
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("nonsense")
    assert RunConfig().model == "tiny-resnet"


def test_records_are_atomic_and_json_safe(tmp_path):
    rec = {"a": float("nan"), "b": np.float32(0.5), "c": np.arange(3)}
    path = write_record(tmp_path / "r.json", rec)
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5, "c": [0, 1, 2]}
    assert read_record(path)["b"] == 0.5
    assert list_records(tmp_path) == [path]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    write_arrays(tmp_path / "p" / "x.npz", **{"probs/a": np.eye(2)})
    assert np.array_equal(np.load(tmp_path / "p" / "x.npz")["probs/a"], np.eye(2))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match=r"broken\.json"):
        read_record(tmp_path / "broken.json")


def test_files_written_through_safetensors_are_readable_like_others(tmp_path):
    """safetensors replaces the file it writes with a 0600 one; the result gets the umask's mode."""
    import os

    import torch

    from clinadapt.classifier import ImageClassifier
    from clinadapt.features import FeatureCache
    from clinadapt.models import load_model
    from clinadapt.targets import apply_target, save_adapted

    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    json_file = write_record(tmp_path / "r.json", {"a": 1})
    model = ImageClassifier(load_model("tiny-resnet"), 2)
    info = apply_target(model, "head")
    weights = save_adapted(model, tmp_path / "head.safetensors", base="tiny-resnet", target=info)
    ds = ClinicalDataset("f", ArraySource(np.zeros((3, 8, 8), np.uint8)), [0, 1, 0], ["a", "b"])
    cache = FeatureCache(tmp_path / "features")
    with torch.no_grad():
        cache.features(model, ds, 2, "cpu")
    (features,) = (tmp_path / "features").glob("*.safetensors")
    for path in (json_file, weights, features):
        assert os.stat(path).st_mode & 0o777 == expected, path
