"""Output that survives logs and scripts: --quiet/--json everywhere, no bar floods, no wraps."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from clinadapt import progress
from clinadapt.cli import app
from clinadapt.data import load_dataset
from clinadapt.errors import ClinadaptError
from clinadapt.shifts import apply_shift

runner = CliRunner(env={"COLUMNS": "200"})
LISTINGS = ["models", "datasets", "methods", "targets", "shifts", "corruptions", "segmenters"]


def test_every_command_takes_quiet_and_json():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"run", "report", "export", "sweep", "fewshot", "pretrain", "demo"} <= set(names)
    for name in names:
        out = runner.invoke(app, [name, "--help"])
        assert out.exit_code == 0, out.output
        assert "--json" in out.stdout and "--quiet" in out.stdout, name


@pytest.mark.parametrize("name", LISTINGS)
def test_listings_print_json(name):
    out = runner.invoke(app, [name, "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert rows and all({"name", "help", "tags"} <= set(r) for r in rows)


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("CLINADAPT_PROGRESS", raising=False)
    progress.set_quiet(False)
    try:
        assert not sys.stderr.isatty()  # pytest captures stderr
        assert not progress.bars_enabled()
        items = [1, 2, 3]
        assert type(progress.progress(items, "x")) is type(iter(items))
        assert progress.bar(3, "x").disable
        monkeypatch.setenv("CLINADAPT_PROGRESS", "1")
        assert progress.bars_enabled()
        monkeypatch.setenv("CLINADAPT_PROGRESS", "0")
        assert not progress.bars_enabled()
    finally:
        progress.set_quiet(False)


def test_a_status_said_once_per_process(capsys):
    progress.set_quiet(False)
    for _ in range(5):
        progress.status_once("reusing trained model fit-abc.safetensors (test)")
    err = capsys.readouterr().err
    assert err.count("reusing trained model fit-abc.safetensors (test)") == 1


def test_a_logged_run_has_no_carriage_returns(tmp_path):
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("CLINADAPT_QUIET", None)
    env.pop("CLINADAPT_PROGRESS", None)
    cmd = [sys.executable, "-m", "clinadapt.cli", "run", "--out", str(tmp_path)]
    cmd += ["-o", "data_options.patients_per_site=6", "-o", "method_options.epochs=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
    assert "training tiny-resnet with finetune" in proc.stderr
    assert "result record:" in proc.stdout


def test_a_long_command_in_a_message_is_one_line(tmp_path):
    env = {**os.environ, "COLUMNS": "60", "CLINADAPT_OFFLINE": "1"}
    env["CLINADAPT_MODEL_DIR"] = str(tmp_path / "models")
    env["HF_HUB_CACHE"] = str(tmp_path / "hf")
    cmd = [sys.executable, "-m", "clinadapt.cli", "run", "--model", "resnet50", "--out"]
    cmd += [str(tmp_path / "r"), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    line = next(x for x in proc.stderr.splitlines() if "hf download" in x)
    want = f"hf download timm/resnet50.a1_in1k model.safetensors --local-dir {tmp_path}"
    assert want in line


def test_messages_show_plain_names_not_numpy_reprs():
    ds = load_dataset("clinical-shift", patients_per_site=5)
    cases = [
        ("domain", {"source": "site-x"}),
        ("lodo", {"holdout": "site-x"}),
        ("domain", {"key": "scanner", "source": "x"}),
        ("corruption", {"source": "site-z"}),
    ]
    for protocol, options in cases:
        with pytest.raises(ClinadaptError) as e:
            apply_shift(ds, protocol, **options)
        assert "np.str_" not in str(e.value) and "np.int" not in str(e.value)
    with pytest.raises(ClinadaptError) as e:
        ds.split("bogus")
    assert "np.str_" not in str(e.value) and "'train'" in str(e.value)
