"""One meaning of --set in every command, option help with types and defaults, did-you-mean."""

import json

import pytest
from typer.testing import CliRunner

import clinadapt
from clinadapt.cli import app
from clinadapt.config import apply_settings, load_config
from clinadapt.errors import ConfigError
from clinadapt.methods.tta.tent import TentOptions
from clinadapt.sweep import load_sweep
from clinadapt.targets.lora import LoraOptions

runner = CliRunner(env={"COLUMNS": "200"})


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_version():
    out = _ok(runner.invoke(app, ["--version"])).stdout
    assert out.strip() == f"clinadapt {clinadapt.__version__}"


def test_method_kinds_survive_the_table():
    out = _ok(runner.invoke(app, ["methods"])).stdout
    tent = next(line for line in out.splitlines() if " tent " in line)
    finetune = next(line for line in out.splitlines() if " finetune " in line)
    assert "[tta]" in tent and "[fit]" in finetune


def test_method_options_with_types_defaults_and_descriptions():
    info = json.loads(_ok(runner.invoke(app, ["methods", "tent", "--json"])).stdout)
    assert info["kind"] == "tta" and info["default_target"] == "norm"
    options = {o["name"]: o for o in info["options"]}
    assert set(options) == set(TentOptions.model_fields)
    assert options["lr"]["type"] == "float"
    assert options["lr"]["default"] == TentOptions().lr == 0.001
    assert options["lr"]["description"] == TentOptions.model_fields["lr"].description
    assert options["optimizer"]["default"] == "adam"
    text = _ok(runner.invoke(app, ["methods", "tent"])).stdout
    assert "lr" in text and "0.001" in text and "learning rate" in text and "Literal" in text


def test_target_shift_model_corruption_details():
    lora = json.loads(_ok(runner.invoke(app, ["targets", "lora", "--json"])).stdout)
    assert {o["name"]: o["default"] for o in lora["options"]}["rank"] == LoraOptions().rank == 8
    shift = json.loads(_ok(runner.invoke(app, ["shifts", "corruption", "--json"])).stdout)
    names = [o["name"] for o in shift["options"]]
    assert names == ["corruptions", "severities", "source", "key"]
    model = json.loads(_ok(runner.invoke(app, ["models", "tiny-vit", "--json"])).stdout)
    assert model["family"] == "timm" and model["kwargs"]["embed_dim"] == 64
    jpeg = json.loads(_ok(runner.invoke(app, ["corruptions", "jpeg", "--json"])).stdout)
    assert "xray" in jpeg["modalities"] and len(jpeg["severity_parameters"]) == 5
    unknown = runner.invoke(app, ["methods", "tentt"])
    assert unknown.exit_code != 0 and "did you mean 'tent'" in str(unknown.exception).lower()


def test_unknown_option_suggests_the_closest_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method_option.epochs=1"])
    message = str(e.value)
    assert "unknown option 'method_option'; did you mean 'method_options'?" in message
    assert "pydantic" not in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"did you mean 'method_options\.epochs'"):
        load_config(None, ["epochs=3"])
    with pytest.raises(ConfigError, match=r"option 'batch_size': .*greater than or equal to 1"):
        load_config(None, ["batch_size=0"])
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        clinadapt.methods.METHODS.get("tent")().parse_options({"lrr": 0.1})
    # numpy takes no negative seed: refused before any work (it failed inside training)
    with pytest.raises(ConfigError, match=r"option 'seed': .*greater than or equal to 0"):
        load_config(None, ["seed=-1"])
    from clinadapt.fewshot_sweep import run_configs
    from clinadapt.ssl import make_config

    with pytest.raises(ConfigError, match=r"seed -1\).*option 'seed'"):
        run_configs(load_config(None), ["knn"], [1], [0, -1])
    with pytest.raises(ConfigError, match="option 'seed'"):
        make_config(seed=-2)


def test_apply_settings_is_dotted_yaml():
    data = apply_settings({"a": {"x": 1}}, ["a.b.c=3", "d=[1, 2]", "e=1e-3", "f=site-a"])
    assert data == {"a": {"x": 1, "b": {"c": 3}}, "d": [1, 2], "e": 0.001, "f": "site-a"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_settings({}, ["novalue"])
    with pytest.raises(ConfigError, match="empty field name"):
        apply_settings({}, ["a..b=1"])


def test_pretrain_set_means_the_same_as_run(monkeypatch):
    seen = {}

    def capture(cfg):
        seen["cfg"] = cfg
        return {"steps": 0}

    monkeypatch.setattr("clinadapt.ssl.pretrain", capture)
    args = ["pretrain", "--method", "simclr", "--model", "tiny-vit", "--data", "clinical-shift"]
    _ok(
        runner.invoke(
            app,
            [
                *args,
                "--set",
                "data_options.patients_per_site=30",
                "--set",
                "method_options.temperature=0.2",
                "--json",
            ],
        )
    )
    cfg = seen["cfg"]
    assert cfg.data_options == {"patients_per_site": 30}
    assert cfg.method_options == {"temperature": 0.2}
    bad = runner.invoke(app, [*args, "--set", "temperature=0.2"])
    assert isinstance(bad.exception, ConfigError)
    assert "did you mean 'method_options.temperature'" in str(bad.exception)


def test_sweep_set_applies_to_every_run(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: {data_options: {patients_per_site: 20}}\ngrid: {seeds: [0, 1]}\n")
    spec = load_sweep(sweep, out_dir=str(tmp_path), settings=["method_options.epochs=2"])
    configs = spec.configs()
    assert [c.method_options for c in configs] == [{"epochs": 2}, {"epochs": 2}]
    assert [c.data_options for c in configs] == [{"patients_per_site": 20}] * 2
    plain = load_sweep(sweep, out_dir=str(tmp_path)).configs()
    args = ["sweep", str(sweep), "--out", str(tmp_path), "--dry-run", "--json"]
    rows = json.loads(_ok(runner.invoke(app, [*args, "-o", "method_options.epochs=2"])).stdout)
    assert [r["run_id"] for r in rows] == [c.run_id() for c in configs]
    assert {c.run_id() for c in plain}.isdisjoint(r["run_id"] for r in rows)


def test_fewshot_method_options_keyed_by_method(tmp_path):
    args = ["fewshot", "--methods", "knn", "--out", str(tmp_path)]
    bad = runner.invoke(app, [*args, "--set", "method_options.k=3"])
    assert isinstance(bad.exception, ConfigError)
    assert "method_options.knn.k=10" in str(bad.exception)
