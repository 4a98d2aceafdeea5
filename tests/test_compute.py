"""--device auto and --precision: resolved before any work, used, and recorded."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.compute import active_autocast, check_precision, grad_scaler, resolve_device
from clinadapt.config import RunConfig
from clinadapt.errors import ConfigError
from clinadapt.features import feature_key
from clinadapt.methods.base import Context
from clinadapt.runner import build_classifier, run_experiment
from clinadapt.ssl import make_config, pretrain

SMALL = {"patients_per_site": 8}
runner = CliRunner(env={"COLUMNS": "200"})
NO_GPU = not torch.cuda.is_available()


def test_auto_device_and_clear_errors_for_absent_ones():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto") == expected and resolve_device(None) == expected
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="cpu, cuda or mps"):
        resolve_device("meta")
    if NO_GPU:
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_precision_rules():
    check_precision("bf16", "cpu")
    check_precision("fp32", "cpu")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="one of fp32, bf16, fp16"):
        check_precision("fp8", "cpu")
    assert not grad_scaler("cpu", "bf16").is_enabled()


def test_bf16_autocast_is_what_the_context_runs():
    ctx = Context(precision="bf16")
    layer = torch.nn.Linear(4, 3)
    with ctx.autocast():
        assert active_autocast("cpu") == "bfloat16"
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    assert active_autocast("cpu") is None
    with Context().autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_weights_updated_inside_one_autocast_region_are_used():
    """The runner holds one autocast region around fit, adaptation and prediction: a forward pass
    after an optimiser step must see the new weights, not autocast's cached bf16 copy of the old."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with Context(precision="bf16").autocast():
        before = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)
        after = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region: the new weights
        expected = layer(x)
    assert torch.equal(after, expected) and not torch.equal(after, before)


def test_training_inside_one_autocast_region_learns_as_in_fp32():
    """Adam on a small regression inside one bf16 region reaches about the fp32 loss (with the
    stale weight cache the loss stayed where it started)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        x = torch.randn(64, 8)
        y = x[:, :1] * 2 - x[:, 1:2]
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        with Context(precision=precision).autocast():
            first = None
            for _ in range(60):
                loss = torch.nn.functional.mse_loss(net(x).float(), y)
                first = first if first is not None else loss.item()
                opt.zero_grad()
                loss.backward()
                opt.step()
        losses[precision] = (first, loss.item())
    (f32_start, f32_end), (b16_start, b16_end) = losses["fp32"], losses["bf16"]
    assert f32_end < 0.2 * f32_start
    assert b16_end < 0.2 * b16_start and b16_end < 2 * f32_end + 0.05


def test_feature_cache_key_follows_the_precision():
    from clinadapt.data import load_dataset

    ds = load_dataset("clinical-shift", patients_per_site=5)
    model = build_classifier(RunConfig(device="cpu"), ds.num_classes, ds.class_names)
    plain = feature_key(model, ds)
    with Context(precision="bf16").autocast():
        mixed = feature_key(model, ds)
    assert plain != mixed and feature_key(model, ds) == plain


def test_bf16_run_is_recorded_and_kept_apart(tmp_path):
    base = {"data_options": SMALL, "method_options": {"epochs": 1}, "out_dir": str(tmp_path)}
    fp32 = run_experiment(RunConfig(**base))
    bf16 = run_experiment(RunConfig(precision="bf16", **base))
    assert fp32["compute"] == {
        "device": resolve_device("auto"),
        "device_requested": "auto",
        "precision": "fp32",
        "autocast": False,
    } or fp32["compute"]["device"].startswith("cuda")
    assert bf16["compute"]["precision"] == "bf16" and bf16["compute"]["autocast"]
    assert bf16["run_id"] != fp32["run_id"]
    assert bf16["training"]["weights"] != fp32["training"]["weights"]  # another fitted model
    assert "precision" not in RunConfig().identity()  # fp32 run ids are those of before


def test_cli_precision_and_device(tmp_path):
    args = ["run", "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path), "--json"]
    args += ["-o", "data_options.patients_per_site=8", "-o", "method_options.epochs=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(Path(json.loads(result.stdout)["record"]).read_text())
    assert record["compute"]["device"] == "cpu" and record["compute"]["precision"] == "bf16"
    assert record["compute"]["device_requested"] == "cpu"
    bad = runner.invoke(
        app, ["run", "--precision", "fp16", "--device", "cpu", "--out", str(tmp_path)]
    )
    assert bad.exit_code != 0 and "fp16 needs a GPU" in str(bad.exception)


def test_bf16_pretraining_records_its_compute(tmp_path):
    cfg = make_config(
        method="simclr",
        model="tiny-vit",
        data="clinical-shift",
        data_options={"patients_per_site": 5},
        max_steps=2,
        batch_size=8,
        precision="bf16",
        evaluate=False,
        out_dir=str(tmp_path / "pt"),
    )
    summary = pretrain(cfg)
    assert summary["compute"]["precision"] == "bf16" and summary["steps"] == 2
    assert summary["loss_last"] == summary["loss_last"]  # finite, not NaN
