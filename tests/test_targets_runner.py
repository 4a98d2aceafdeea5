import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.config import RunConfig
from clinadapt.runner import run_experiment

SMALL = {"patients_per_site": 20}


def _cfg(tmp_path, **kw) -> RunConfig:
    return RunConfig(
        model="tiny-vit",
        method="finetune",
        method_options={"epochs": 1},
        data_options=SMALL,
        out_dir=str(tmp_path),
        **kw,
    )


def test_runner_records_lora_count_and_adaptive_temperature_on_off(tmp_path):
    opts = {"lora": {"rank": 2}}
    on = run_experiment(
        _cfg(tmp_path, target="lora+head", target_options=opts, adaptive_temperature=True)
    )
    # rank-2 LoRA on each fused qkv (64 -> 192) of 2 blocks, plus a 64 -> 4 head
    assert on["target"]["trainable"] == 2 * 2 * (64 + 3 * 64) + 64 * 4 + 4
    assert on["target"]["options"] == {
        "lora": {"rank": 2, "alpha": 8.0, "dropout": 0.0, "target_modules": None},
        "head": {},
    }
    assert on["adaptive_temperature"] == {"attention_layers": 2, "output": True}
    off = run_experiment(_cfg(tmp_path, target="lora+head", target_options=opts))
    assert off["adaptive_temperature"] is None
    assert off["training"].get("reused")  # the same trained model, evaluated both ways
    p_on = np.load(Path(tmp_path) / "predictions" / f"{on['run_id']}.npz")
    p_off = np.load(Path(tmp_path) / "predictions" / f"{off['run_id']}.npz")
    key = "probs/site-b"
    assert p_on[key].shape == p_off[key].shape
    assert not np.allclose(p_on[key], p_off[key])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["last-k", "lora", "adapter", "prompt", "norm+prompt"])
def test_cli_runs_every_target_on_tiny_vit(tmp_path, target):
    cli = CliRunner(env={"COLUMNS": "200"})
    args = ["run", "--model", "tiny-vit", "--target", target, "--method", "finetune"]
    args += ["-o", "method_options.epochs=1", "-o", "data_options.patients_per_site=20"]
    args += ["--out", str(tmp_path), "--json"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(Path(json.loads(result.stdout)["record"]).read_text())
    expected = {
        # the last block (2 norms, qkv, proj, fc1, fc2) and the final norm
        "last-k": 4 * 64
        + (64 * 192 + 192)
        + (64 * 64 + 64)
        + (64 * 256 + 256)
        + (256 * 64 + 64)
        + 2 * 64,
        "lora": 2 * 8 * (64 + 3 * 64),
        "adapter": 2 * (2 * 64 * 64 + 64 + 64),
        "prompt": 2 * 10 * 64,
        "norm+prompt": 5 * 2 * 64 + 2 * 10 * 64,
    }[target]
    assert record["target"]["trainable"] == expected
    assert record["target"]["changes"] == f"the parameters of target {target}"
