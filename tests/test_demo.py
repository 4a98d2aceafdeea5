"""The demo's plan and the wall time it reports."""

import subprocess
import sys

import pytest

from clinadapt.demo import Stopwatch, demo_configs, seconds_since_process_start
from clinadapt.methods import METHODS


def test_demo_trains_one_source_model_then_adapts_it():
    cfgs = demo_configs("out", seed=3, device="cuda:0")
    assert [(c.method, c.shift) for c in cfgs] == [
        ("finetune", "domain"),
        ("bn", "domain"),
        ("tent", "domain"),
        ("source", "corruption"),
        ("bn", "corruption"),
        ("tent", "corruption"),
    ]
    assert {(c.model, c.data, c.seed, c.device, c.out_dir) for c in cfgs} == {
        ("tiny-resnet", "clinical-shift", 3, "cuda:0", "out")
    }
    # the test-time runs adapt the model the first run trains (finetune on site-a)
    assert all(METHODS.get(c.method).kind == "tta" for c in cfgs[1:])
    assert {c.source.method for c in cfgs} == {"finetune"}
    assert {c.shift_options.get("source", "site-a") for c in cfgs} == {"site-a"}
    cfgs[3].shift_options["source"] = "site-b"  # each config has its own options
    assert cfgs[4].shift_options["source"] == "site-a"


def test_the_clock_counts_from_the_start_of_the_process():
    code = (
        "import time; time.sleep(1.0); "
        "from clinadapt.demo import Stopwatch; print(Stopwatch().seconds())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 1.0 <= float(out.stdout) < 60  # the sleep before the clock was made counts
    own = seconds_since_process_start()
    assert own is None or own > 0
    clock = Stopwatch()
    assert clock.seconds() >= (own or 0.0)


@pytest.mark.slow
def test_the_demo_command_runs_each_run_once_and_ends_with_its_wall_time(
    tmp_path, monkeypatch, capsys
):
    """The command once ran its six runs and the report a second time after printing the
    tables, and never printed the wall time it measured."""
    import clinadapt.demo
    import clinadapt.runner
    from clinadapt.cli import main

    plan = clinadapt.demo.demo_configs
    monkeypatch.setattr(  # the demo's plan on a small dataset
        clinadapt.demo,
        "demo_configs",
        lambda out, seed=0, **f: plan(out, seed, data_options={"patients_per_site": 6}, **f),
    )
    real, calls = clinadapt.runner.run_experiment, []

    def counted(cfg):
        calls.append((cfg.method, cfg.shift))
        return real(cfg)

    monkeypatch.setattr(clinadapt.runner, "run_experiment", counted)
    monkeypatch.setattr(sys, "argv", ["clinadapt", "demo", "--out", str(tmp_path / "demo")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code in (0, None)
    assert sorted(calls) == sorted((c.method, c.shift) for c in plan("x"))  # each run once
    out = capsys.readouterr().out
    assert "done in" in out and "wall time of the command" in out
    assert out.rstrip().endswith("report.html")
