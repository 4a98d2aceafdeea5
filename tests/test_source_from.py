"""source.from: test-time adapt or evaluate a model fitted earlier; checkpoints in the run folder."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.config import RunConfig, load_config
from clinadapt.errors import ConfigError, DataError
from clinadapt.fitted import load_fitted
from clinadapt.runner import run_experiment

SMALL = {"patients_per_site": 8}
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    cfg = RunConfig(
        method="finetune",
        method_options={"epochs": 1, "checkpoint": "best.safetensors"},
        data_options=SMALL,
        out_dir=str(out / "runs"),
    )
    record = run_experiment(cfg)
    return out / "runs", record


def test_checkpoint_lands_in_the_run_folder_with_its_metadata(fitted_run, tmp_path, monkeypatch):
    runs, record = fitted_run
    path = runs / "best.safetensors"
    assert record["training"]["checkpoint_file"] == str(path) and path.is_file()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == record["data"]["class_names"]
    assert json.loads(meta["preprocess"])["image_size"] == [64, 64]
    assert meta["method"] == "finetune" and meta["target"] == "full"
    assert meta["base_model"] == "tiny-resnet"
    assert record["training"]["weights"].startswith("cache/fit-")


def test_evaluating_a_fitted_model_gives_its_own_numbers(fitted_run):
    runs, record = fitted_run
    again = run_experiment(
        load_config(
            None,
            [f"source.from={runs / (record['run_id'] + '.json')}"],
            method="source",
            data_options=SMALL,
            out_dir=str(runs.parent / "eval"),
        )
    )
    link = again["source"]["from"]
    assert link["run_id"] == record["run_id"]
    assert link["weights"].endswith(record["training"]["weights"].split("/")[-1])
    assert "history" not in again["source"]["training"]  # nothing was trained
    for name, metrics in record["metrics"].items():
        for key in ("accuracy", "balanced_accuracy", "auroc"):
            assert again["metrics"][name][key] == pytest.approx(
                metrics[key], abs=1e-12, nan_ok=True
            )
    assert not (runs.parent / "eval" / "cache").exists() or not list(
        (runs.parent / "eval" / "cache").glob("fit-*.safetensors")
    )


def test_tent_from_a_weights_file_via_the_cli(fitted_run):
    runs, _ = fitted_run
    out = runs.parent / "tent"
    args = ["run", "--method", "tent", "--out", str(out), "--json"]
    args += ["--set", "data_options.patients_per_site=8"]
    args += ["--set", f"source.from={runs / 'best.safetensors'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    tent = json.loads(Path(json.loads(result.stdout)["record"]).read_text())
    assert tent["config"]["source"]["from"] == str(runs / "best.safetensors")
    assert tent["source"]["from"]["weights"] == str((runs / "best.safetensors").resolve())
    assert tent["source"]["method"] == "finetune"
    # the record of this test-time run links back, so exporting it exports the same source model
    fitted = load_fitted(json.loads(result.stdout)["record"])
    assert fitted.origin["weights"] == str((runs / "best.safetensors").resolve())


def test_source_from_is_checked_before_use(fitted_run, tmp_path):
    runs, record = fitted_run
    rec = runs / f"{record['run_id']}.json"
    with pytest.raises(ConfigError, match="add --model tiny-resnet"):
        run_experiment(
            load_config(
                None,
                [f"source.from={rec}"],
                method="tent",
                model="tiny-vit",
                data_options=SMALL,
                out_dir=str(tmp_path),
            )
        )
    with pytest.raises(ConfigError, match="trains its own"):
        run_experiment(
            load_config(None, [f"source.from={rec}"], data_options=SMALL, out_dir=str(tmp_path))
        )
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match=r"x\.safetensors"):
        load_fitted(bad)
    pickle = tmp_path / "weights.pt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ConfigError, match=r"weights\.pt"):
        load_fitted(pickle)
    gone = json.loads(rec.read_text())
    gone["training"]["weights"] = "cache/fit-missing.safetensors"
    (tmp_path / "gone.json").write_text(json.dumps(gone))
    with pytest.raises(DataError, match="are gone"):
        load_fitted(tmp_path / "gone.json")


def test_source_from_keeps_earlier_run_ids():
    plain = RunConfig(method="tent")
    assert "from" not in plain.identity()["source"]
    linked = RunConfig(method="tent", source={"from": "a.json"})
    assert linked.run_id() != plain.run_id()
    assert linked.model_dump()["source"]["from"] == "a.json"
