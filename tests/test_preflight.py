"""A run checks what it can before any work, and repairs damaged caches, saying which file."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

import clinadapt.runner as runner
from clinadapt.compute import resolve_device
from clinadapt.config import RunConfig, load_config
from clinadapt.errors import ConfigError
from clinadapt.evaluation.subgroups import SUBGROUP_KEYS
from clinadapt.fewshot_sweep import run_fewshot_sweep
from clinadapt.preflight import check_out_dir, check_subgroup_keys
from clinadapt.ssl import make_config, pretrain

SMALL = {"patients_per_site": 8}


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a run reads its dataset: the error must come first."""

    def refuse(*a, **k):
        raise AssertionError("the dataset was read before the configuration was checked")

    monkeypatch.setattr(runner, "load_dataset", refuse)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data_options": {"patient_per_site": 8}}, "did you mean 'patients_per_site'"),
        ({"data_options": {"patients_per_site": "ten"}}, "'patients_per_site'.*valid integer"),
        ({"shift_options": {"sorce": "site-a"}}, "did you mean 'source'"),
        ({"method_options": {"epochs": 1, "lr": float("inf")}}, "finite number"),
        ({"method_options": {"lr": float("nan")}}, "finite number"),
        ({"method": "bn", "source": {"options": {"lr": float("inf")}}}, "finite number"),
        ({"target": "lora", "target_options": {"rnk": 2}}, "rnk"),
        ({"device": "cuda:7"}, "cuda:7"),
        ({"device": "gpu"}, "not a torch device"),
    ],
)
def test_bad_settings_fail_before_the_data_is_read(tmp_path, no_data, overrides, message):
    cfg = RunConfig(**{"out_dir": str(tmp_path), **overrides})
    with pytest.raises(ConfigError, match=message):
        runner.run_experiment(cfg)


def test_lr_inf_is_refused_by_the_config_itself():
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, evaluation={"alpha": float("nan")})
    with pytest.raises(ConfigError, match="finite"):
        make_config(lr=float("inf"))


def test_out_must_be_a_writable_folder(tmp_path, no_data):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        runner.run_experiment(RunConfig(out_dir=str(a_file)))
    with pytest.raises(ConfigError, match="not writable"):
        check_out_dir(a_file / "runs")  # a folder cannot be made under a file
    assert check_out_dir(tmp_path / "new" / "runs").is_dir()
    with pytest.raises(ConfigError, match="is a file"):
        run_fewshot_sweep(RunConfig(out_dir=str(a_file), data_options=SMALL), ["knn"], [1], [0])
    with pytest.raises(ConfigError, match="is a file"):
        pretrain(make_config(out_dir=str(a_file), data_options=SMALL))


def test_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        pretrain(make_config(device="cuda", out_dir="unused", data_options=SMALL))


def _finetune(tmp_path):
    return RunConfig(
        data_options=SMALL,
        method_options={"epochs": 1},
        evaluation={"n_boot": 0},
        out_dir=str(tmp_path),
    )


def test_a_damaged_fit_cache_is_named_and_trained_again(tmp_path, capsys):
    cfg = _finetune(tmp_path)
    first = runner.run_experiment(cfg)
    (cache,) = (tmp_path / "cache").glob("fit-*.safetensors")
    for damage in ("truncate", "nan"):
        if damage == "truncate":
            cache.write_bytes(cache.read_bytes()[:100])
        else:
            state = load_file(str(cache))
            nan = {
                k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()
            }
            save_file(nan, str(cache))
        capsys.readouterr()
        again = runner.run_experiment(cfg)
        err = capsys.readouterr().err
        assert f"cached fit {cache} is damaged" in err, damage
        assert "reused" not in again["training"]  # trained again, from the same start
        assert again["metrics"] == first["metrics"]
    assert "reused" in runner.run_experiment(cfg)["training"]  # the repaired cache serves


def test_a_nan_feature_cache_is_named_and_embedded_again(tmp_path, capsys):
    base = RunConfig(data_options=SMALL, evaluation={"n_boot": 0}, out_dir=str(tmp_path))
    first = runner.run_experiment(base.model_copy(update={"method": "prototype"}))
    files = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    good = {f: load_np(str(f))["features"] for f in files}
    for f, feats in good.items():
        save_np({"features": np.full_like(feats, np.nan)}, str(f))
    capsys.readouterr()
    rec = runner.run_experiment(base.model_copy(update={"method": "knn"}))
    err = capsys.readouterr().err
    for f, feats in good.items():
        assert f"feature cache {f} holds non-finite values" in err
        assert np.array_equal(load_np(str(f))["features"], feats)  # embedded and stored again
    assert set(rec["metrics"]) == set(first["metrics"])


def test_a_subgroup_key_no_metadata_holds_is_refused_before_training(tmp_path, monkeypatch):
    """`evaluation.subgroup_keys=[sexx]` used to leave every record without subgroups, silently."""

    def no_training(*a, **k):
        raise AssertionError("a model was trained before the subgroup keys were checked")

    monkeypatch.setattr(runner, "fit_source", no_training)
    cfg = RunConfig(
        data_options={"patients_per_site": 8},
        evaluation={"subgroup_keys": ["domain", "sexx"]},
        out_dir=str(tmp_path),
    )
    with pytest.raises(ConfigError, match=r"\['sexx'\] in no metadata column.*did you mean 'sex'"):
        runner.run_experiment(cfg)
    with pytest.raises(ConfigError, match=r"\['sexx'\] in no metadata column"):
        run_fewshot_sweep(cfg, ["prototype"], [1], [0])


def test_a_chosen_default_key_the_data_lack_is_refused():
    """`subgroup_keys=[sex]` on data without a sex column used to pass silently (sex is one of
    the default keys, which a dataset may lack) and every record came without subgroups."""
    meta = {"domain": ["a", "b"], "scanner": ["x", "y"]}
    with pytest.raises(ConfigError, match=r"\['sex'\] in no metadata column of mine"):
        check_subgroup_keys(["sex"], meta, "mine")
    with pytest.raises(ConfigError, match=r"\['age_group'\]"):
        check_subgroup_keys(["domain", "age_group"], meta, "mine")
    check_subgroup_keys(["domain", "scanner"], meta, "mine")
    check_subgroup_keys(list(SUBGROUP_KEYS), meta, "mine")  # the default list: what is there
