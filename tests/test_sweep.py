"""Sweeps: the product of settings, one record per run, resumable after an interruption."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import clinadapt.sweep as sweep_mod
from clinadapt.errors import ConfigError
from clinadapt.evaluation.report import write_report
from clinadapt.store import list_records, read_record
from clinadapt.sweep import Sweep, describe, load_sweep, run_sweep

SWEEP = {
    "base": {
        "data_options": {"patients_per_site": 8},
        "source": {"options": {"epochs": 1}},
        "batch_size": 32,
    },
    "grid": {
        "methods": [
            {"method": "finetune", "method_options": {"epochs": 1}},
            {"method": "linear-probe", "method_options": {"max_iter": 200}},
            "bn",
        ],
        "shifts": [
            "domain",
            {"shift": "corruption", "shift_options": {"corruptions": ["blur"], "severities": [2]}},
        ],
        "seeds": [0, 1],
    },
}


class Crash(BaseException):
    """Not an Exception: a run never records it as its own failure (as KeyboardInterrupt)."""


def _write(tmp_path: Path, spec: dict = SWEEP) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**spec, "out_dir": str(tmp_path / "runs")}))
    return path


def test_grid_expands_aliases_dicts_and_dotted_fields(tmp_path):
    spec = Sweep(
        base={"method_options": {"epochs": 1}},
        grid={"seeds": [0, 1], "method_options.lr": [0.1, 0.2, 0.1]},
        out_dir=str(tmp_path),
    )
    configs = spec.configs()
    assert [(c.seed, c.method_options) for c in configs] == [
        (0, {"epochs": 1, "lr": 0.1}),
        (0, {"epochs": 1, "lr": 0.2}),
        (1, {"epochs": 1, "lr": 0.1}),
        (1, {"epochs": 1, "lr": 0.2}),
    ]  # the repeated lr gives the same runs, which are kept once
    assert all(c.out_dir == str(tmp_path) for c in configs)
    loaded = load_sweep(_write(tmp_path))
    cfgs = loaded.configs()
    assert len(cfgs) == 12 and len({c.run_id() for c in cfgs}) == 12
    corr = [c for c in cfgs if c.shift == "corruption"]
    assert len(corr) == 6 and corr[0].shift_options["severities"] == [2]
    assert {c.method for c in cfgs} == {"finetune", "linear-probe", "bn"}


def test_sweep_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {seeds: 3}\n")
    with pytest.raises(ConfigError, match=r"grid\.seeds must be a non-empty list"):
        load_sweep(bad)
    bad.write_text("bsae: {}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match=r"sweep run \{'batch_size': 0\}: option 'batch_size'"):
        Sweep(base={}, grid={"batch_size": [0]}, out_dir=str(tmp_path)).configs()
    with pytest.raises(ConfigError, match="workers"):
        run_sweep(Sweep(base={}, grid={}, out_dir=str(tmp_path)), workers=0)


def test_ray_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    spec = Sweep(base={"data_options": {"patients_per_site": 8}}, grid={}, out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"pip install 'clinadapt\[ray\]'"):
        run_sweep(spec, use_ray=True)


@pytest.mark.slow
def test_sweep_interrupted_resumes_without_redoing_runs(tmp_path, monkeypatch):
    spec = load_sweep(_write(tmp_path))
    out = Path(spec.out_dir)
    from clinadapt import runner

    calls = []
    armed = [True]
    real = runner.run_experiment

    def interrupted_after_five(cfg, *a, **k):
        calls.append(cfg.run_id())
        if armed[0] and len(calls) == 6:
            raise Crash  # like Ctrl-C or a dying machine during the sixth run
        return real(cfg, *a, **k)

    monkeypatch.setattr(runner, "run_experiment", interrupted_after_five)
    with pytest.raises(Crash):
        run_sweep(spec)
    first = {p.name: p.stat().st_mtime_ns for p in list_records(out)}
    assert len(first) == 5
    assert [r["done"] for r in describe(spec)].count(True) == 5

    calls.clear()
    armed[0] = False
    result = run_sweep(spec)
    assert len(result.skipped) == 5 and len(result.ran) == 7 and not result.failed
    assert len(calls) == 7 and not set(calls) & {n.removesuffix(".json") for n in first}
    records = {p.name: p for p in list_records(out)}
    assert len(records) == 12
    for name, mtime in first.items():  # finished runs were not redone
        assert records[name].stat().st_mtime_ns == mtime
    assert run_sweep(spec).ran == []  # a third pass has nothing left to do
    rec = read_record(next(iter(records.values())))
    for key in ("config", "seed", "versions", "data", "timings", "metrics"):
        assert key in rec
    assert rec["data"]["fingerprint"]
    html = write_report(out).html
    assert html.exists() and (out / "report.md").exists() and (out / "results.csv").exists()


def test_failed_runs_are_recorded_and_retried(tmp_path):
    spec = Sweep(
        base={"data_options": {"patients_per_site": 8}, "method_options": {"epochs": 1}},
        grid={"shift_options.source": [["site-a"], ["site-x"]]},
        out_dir=str(tmp_path),
    )
    result = run_sweep(spec)
    assert len(result.ran) == 1 and len(result.failed) == 1
    rec = read_record(tmp_path / f"{result.ran[0]}.json")  # what every record carries
    for key in ("config", "seed", "versions", "data", "timings", "metrics", "ci", "subgroups"):
        assert key in rec, key
    assert rec["data"]["fingerprint"] and rec["versions"]["torch"] != "absent"
    assert rec["timings"]["total_s"] > 0 and rec["config"]["shift_options"]["source"] == ["site-a"]
    ((bad_id, error),) = result.failed.items()
    assert "site-x" in error
    assert read_record(tmp_path / "failed" / f"{bad_id}.json")["error"] == error
    again = run_sweep(spec)
    assert again.skipped == result.ran and list(again.failed) == [bad_id]


@pytest.mark.slow
def test_cli_sweep_in_worker_processes_survives_a_kill(tmp_path):
    """Kill a 2-worker sweep after some records exist; a rerun finishes only the rest."""
    spec = {
        "base": {"data_options": {"patients_per_site": 8}, "batch_size": 32},
        "grid": {
            "methods": [{"method": "linear-probe", "method_options": {"max_iter": 200}}],
            "seeds": [0, 1, 2, 3, 4],
        },
    }
    cfg = _write(tmp_path, spec)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "clinadapt.cli", "sweep", str(cfg), "--workers", "2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while len(list_records(out)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, as a crash would
        proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in list_records(out)}
    assert 2 <= len(before) < 5
    cmd[cmd.index("--workers") + 1] = "1"  # resume in-process: no worker start-up to wait for
    done = subprocess.run(
        [*cmd, "--no-report"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    summary = yaml.safe_load(done.stdout)
    assert summary["skipped"] == len(before) and summary["ran"] == 5 - len(before)
    after = {p.name: p.stat().st_mtime_ns for p in list_records(out)}
    assert len(after) == 5 and all(after[k] == v for k, v in before.items())
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_cli_dry_run_and_corruption_listing(tmp_path):
    from typer.testing import CliRunner

    from clinadapt.cli import app

    cli = CliRunner(env={"COLUMNS": "200"})
    res = cli.invoke(app, ["sweep", str(_write(tmp_path)), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    rows = yaml.safe_load(res.stdout)
    assert len(rows) == 12 and not any(r["done"] for r in rows)
    assert not (tmp_path / "runs").exists()  # a dry run runs nothing
    res = cli.invoke(app, ["corruptions", "--json"])
    listed = {e["name"]: e["tags"] for e in yaml.safe_load(res.stdout)}
    assert "stain" in listed and "histology" in listed["stain"]


def test_sweep_module_has_no_ray_import_at_load():
    assert "ray" not in vars(sweep_mod)


def test_dry_run_counts_only_complete_records_of_the_run(tmp_path):
    """A stub, a truncated file or another run's record under a run's name is not done."""
    spec = load_sweep(_write(tmp_path))
    configs = spec.configs()[:4]
    out = Path(spec.out_dir)
    run_id, error = sweep_mod.run_one(configs[0].model_dump())
    assert error is None
    real = (out / f"{run_id}.json").read_text()
    (out / f"{configs[1].run_id()}.json").write_text('{"status": "ok"}')
    (out / f"{configs[2].run_id()}.json").write_text(real[: len(real) // 2])
    (out / f"{configs[3].run_id()}.json").write_text(real)  # run 0's record, copied
    done = {r["run_id"]: r["done"] for r in describe(spec)}
    assert [done[c.run_id()] for c in configs] == [True, False, False, False]
