"""The ``clinadapt pretrain`` command."""

import json

from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.errors import ConfigError
from clinadapt.models import load_model

runner = CliRunner(env={"COLUMNS": "200"})

SMALL = ["--model", "tiny-vit", "--data", "clinical-shift", "--max-steps", "3", "--batch-size", "8"]
SMALL += ["--set", "data_options={patients_per_site: 6}", "--set", "method_options.proj_dim=8"]


def test_pretrain_json_then_resume_and_text(tmp_path):
    out = tmp_path / "pt"
    args = ["pretrain", "--method", "simclr", *SMALL, "--out", str(out), "--lr", "0.001"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 3 and summary["method"]["options"]["proj_dim"] == 8
    assert summary["config"]["lr"] == 0.001
    assert (out / "summary.json").is_file()
    load_model("tiny-vit", weights=summary["weights"])
    # a longer budget on the same folder resumes at step 3; the text output shows the probe table
    again = runner.invoke(app, [*args[:-2], "--lr", "0.001", "--max-steps", "4", "--quiet"])
    assert again.exit_code == 0, again.output
    assert (
        "linear probe" in again.stdout and "before" in again.stdout and "weights:" in again.stdout
    )
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_pretrain_bad_method_and_option(tmp_path):
    result = runner.invoke(app, ["pretrain", "--method", "byol", *SMALL, "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "byol" in str(result.exception)
    bad = runner.invoke(
        app,
        [
            "pretrain",
            "--method",
            "mae",
            *SMALL[:-2],
            "--set",
            "mask_ratio=2",
            "--out",
            str(tmp_path),
        ],
    )
    assert isinstance(bad.exception, ConfigError) and "mask_ratio" in str(bad.exception)
