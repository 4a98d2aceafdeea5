"""End to end: the CLIP methods through the CLI and the runner, on the built-in data."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.config import load_config
from clinadapt.record import load_record
from clinadapt.runner import run_experiment

SMALL = "data_options.patients_per_site=20"
cli = CliRunner(env={"COLUMNS": "200"})


def _cli(out, method, *extra):
    args = ["run", "--model", "tiny-clip", "--method", method, "-o", SMALL]
    result = cli.invoke(app, [*args, *extra, "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    path = json.loads(result.stdout)["record"]
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("zeroshot", []),
        ("coop", ["-o", "method_options.epochs=3"]),
        ("dapl", ["-o", "method_options.epochs=2"]),
        ("tpt", ["--set", "source.method=zeroshot", "-o", "method_options.views=7"]),
        ("tda", ["--set", "source.method=zeroshot"]),
    ],
)
def test_cli_runs_write_records(tmp_path, method, extra):
    record = _cli(tmp_path, method, *extra)
    assert record["method"]["name"] == method
    assert load_record(tmp_path / f"{record['run_id']}.json", run_id=record["run_id"])
    assert set(record["metrics"]) == {"site-a", "site-b", "site-c", "site-d"}
    preds = np.load(tmp_path / "predictions" / f"{record['run_id']}.npz")
    probs = preds["probs/site-b"]
    assert probs.shape[1] == 4
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    if method == "zeroshot":  # nothing is trained: the head is the prompts' text embeddings
        assert record["target"]["trainable"] == 0 and record["target"]["spec"] == "none"
        assert "nothing trained" in record["target"]["changes"]
    if method in ("tpt", "tda"):
        assert record["source"]["method"] == "zeroshot"
        assert record["source"]["target"]["trainable"] == 0
        assert record["target"]["trainable"] == 0 and record["target"]["changes"]
    if method == "dapl":
        assert record["training"]["domains"] == ["source", "site-b", "site-c", "site-d"]


@pytest.mark.slow
def test_cached_prompt_models_reload_to_the_same_predictions(tmp_path):
    for method in ("zeroshot", "coop", "dapl"):
        cfg = load_config(
            model="tiny-clip",
            method=method,
            out_dir=str(tmp_path),
            data_options={"patients_per_site": 20},
            method_options={} if method == "zeroshot" else {"epochs": 2},
        )
        first = run_experiment(cfg)
        probs = dict(np.load(tmp_path / "predictions" / f"{first['run_id']}.npz"))
        second = run_experiment(cfg)
        assert "reused" in second["training"] and "reused" not in first["training"]
        again = np.load(tmp_path / "predictions" / f"{second['run_id']}.npz")
        for key, value in probs.items():
            if value.dtype.kind in "USO":  # metadata beside the predictions (patient ids, keys)
                np.testing.assert_array_equal(again[key], value, err_msg=f"{method} {key}")
            else:
                np.testing.assert_allclose(again[key], value, atol=1e-6, err_msg=f"{method} {key}")


@pytest.mark.slow
def test_tpt_on_a_coop_source(tmp_path):
    cfg = load_config(
        model="tiny-clip",
        method="tpt",
        out_dir=str(tmp_path),
        data_options={"patients_per_site": 20},
        method_options={"views": 3},
        source={"method": "coop", "options": {"epochs": 2}},
    )
    record = run_experiment(cfg)
    assert record["source"]["target"]["spec"] == "text-prompt"
    assert "text prompt context" in record["target"]["changes"]
    # the tuned context changes the predictions of the CoOp source it starts from
    source = run_experiment(cfg.model_copy(update={"method": "source", "method_options": {}}))
    assert source["source"]["training"].get("reused")
    tuned = np.load(tmp_path / "predictions" / f"{record['run_id']}.npz")
    plain = np.load(tmp_path / "predictions" / f"{source['run_id']}.npz")
    np.testing.assert_array_equal(tuned["labels/site-b"], plain["labels/site-b"])
    assert np.abs(tuned["probs/site-b"] - plain["probs/site-b"]).max() > 1e-4
