"""Sweeps and test-time streams on a real Ray cluster, started here (2 CPUs, no dashboard).

The cluster is this test module's own: a local Ray instance started once (this process is its
first driver), joined by a command-line driver started below (``--ray-address``) and stopped at
the end. Runs are tiny; the local sweep they are compared with runs on one thread,
as every Ray task does (one CPU each).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clinadapt import ray_tasks
from clinadapt.config import RunConfig, run_config
from clinadapt.errors import ConfigError
from clinadapt.preflight import check_run
from clinadapt.ray_tasks import forwarded_env, task_gpus
from clinadapt.record import load_record
from clinadapt.runner import run_experiment
from clinadapt.store import list_records, read_record
from clinadapt.sweep import load_sweep, run_sweep

SWEEP = {
    "base": {
        "data_options": {"patients_per_site": 8},
        "batch_size": 32,
        "evaluation": {"n_boot": 20},
    },
    "grid": {
        "methods": [
            {"method": "linear-probe", "method_options": {"max_iter": 50}},
            {"method": "bn", "source": {"options": {"epochs": 1}}},
        ],
        "seeds": [0, 1],
    },
}


@pytest.fixture(scope="module")
def ray_address():
    import ray

    info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield info.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """As in a one-CPU Ray task: torch on one thread (sums keep their order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "clinadapt.cli", *args]


def _wait_stable(out: Path, seconds: float = 3.0, limit: float = 60.0) -> dict[str, int]:
    """Record names and mtimes once nothing has changed for ``seconds`` (a killed driver's
    tasks are stopped by Ray shortly after it dies)."""
    last, since, end = None, time.time(), time.time() + limit
    while time.time() < end:
        now = {p.name: p.stat().st_mtime_ns for p in list_records(out)}
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= seconds:
            break
        time.sleep(0.2)
    return last or {}


def _count_tasks(monkeypatch) -> list[int]:
    """The number of tasks of each ``run_tasks`` call from now on (the real calls, counted)."""
    calls: list[int] = []
    real = ray_tasks.run_tasks

    def counted(fn, args, *a, **k):
        calls.append(len(args))
        return real(fn, args, *a, **k)

    monkeypatch.setattr(ray_tasks, "run_tasks", counted)
    return calls


def _same_results(a: Path, b: Path, run_id: str) -> None:
    ra, rb = read_record(a / f"{run_id}.json"), read_record(b / f"{run_id}.json")
    for key in ("metrics", "ci", "summary", "operating_point", "subgroups"):
        assert ra.get(key) == rb.get(key), (run_id, key)
    pa = np.load(a / "predictions" / f"{run_id}.npz")
    pb = np.load(b / "predictions" / f"{run_id}.npz")
    assert sorted(pa.files) == sorted(pb.files)
    for name in pa.files:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=f"{run_id} {name}")


@pytest.mark.slow
def test_ray_sweep_survives_a_killed_driver_and_matches_a_local_sweep(
    tmp_path, ray_address, one_thread, monkeypatch
):
    spec = {**SWEEP, "out_dir": str(tmp_path / "ray")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "ray"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = _cli(["sweep", str(path), "--ray-address", ray_address, "--json", "--no-report"])
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not list_records(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray stops its tasks
        proc.wait()
    before = _wait_stable(out)
    assert 1 <= len(before) < 4, before
    for name in before:  # a killed run leaves no half-written record under its name
        load_record(out / name)

    # rerun, here: this process is a driver of the same cluster (the fixture's session)
    tasks = _count_tasks(monkeypatch)
    result = run_sweep(load_sweep(path), use_ray=True)
    assert tasks == [4 - len(before)]
    assert len(result.skipped) == len(before) and len(result.ran) == 4 - len(before)
    assert not result.failed
    after = {p.name: p.stat().st_mtime_ns for p in list_records(out)}
    assert len(after) == 4 and all(after[k] == v for k, v in before.items())  # nothing redone

    local = load_sweep(path, out_dir=str(tmp_path / "local"))
    assert run_sweep(local).ran and len(list_records(tmp_path / "local")) == 4
    for cfg in local.configs():  # the same numbers as the runs made here, to the last bit
        _same_results(out, tmp_path / "local", cfg.run_id())


@pytest.mark.slow
def test_tta_streams_as_ray_tasks_match_the_local_streams(
    tmp_path, ray_address, one_thread, monkeypatch
):
    base = {
        "data_options": {"patients_per_site": 8},
        "source": {"options": {"epochs": 1}},
        "shift": "corruption",
        "shift_options": {"corruptions": ["blur", "contrast"], "severities": [3]},
        "stream_batch_size": 8,
        "evaluation": {"n_boot": 20},
        "method": "eata",  # it adapts, and the Fisher estimate of prepare() travels too
    }
    here = run_experiment(RunConfig(**base, out_dir=str(tmp_path / "l")))
    tasks = _count_tasks(monkeypatch)
    cfg = RunConfig(**base, stream_executor="ray", out_dir=str(tmp_path / "r"))
    assert cfg.run_id() == here["run_id"]  # where streams run is not part of the run
    on_ray = run_experiment(cfg)
    assert tasks == [3]  # one task per stream: the clean test set and the two corruptions
    assert len(here["tta"]["per_set"]) == 3
    for key in ("metrics", "tta", "vs_source"):
        assert on_ray[key] == here[key], key
    _same_results(tmp_path / "l", tmp_path / "r", here["run_id"])


def test_stream_executor_is_checked_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="stream_executor=ray runs the test streams"):
        check_run(RunConfig(method="finetune", stream_executor="ray", out_dir=str(tmp_path)))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"stream_executor=ray needs Ray.*clinadapt\[ray\]"):
        check_run(RunConfig(method="tent", stream_executor="ray", out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="option 'stream_executor'"):
        run_config({"method": "tent", "stream_executor": "dask"}, "config")


def test_task_resources_are_checked_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # nothing of Ray is reached
    spec = _sweep_in(tmp_path)
    with pytest.raises(ConfigError, match="CPUs per Ray task must be > 0, got 0"):
        run_sweep(spec, use_ray=True, ray_cpus=0)
    with pytest.raises(ConfigError, match="GPUs per Ray task must be >= 0, got -1"):
        run_sweep(spec, ray_address="127.0.0.1:6379", ray_gpus=-1)
    assert not (tmp_path / "runs").exists()


def _sweep_in(tmp_path: Path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "out_dir": str(tmp_path / "runs")}))
    return load_sweep(path)


def test_tasks_get_the_drivers_clinadapt_settings(monkeypatch):
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", "/models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "x")
    env = forwarded_env()
    assert env["CLINADAPT_MODEL_DIR"] == "/models" and env["HF_HUB_OFFLINE"] == "1"
    assert "HOME_OF_SOMETHING_ELSE" not in env


@pytest.mark.slow
def test_gpus_per_task(ray_address):
    import ray

    assert task_gpus(ray, "cuda", 0.5) == 0.5  # as asked
    assert task_gpus(ray, "cpu", None) == 0.0
    assert task_gpus(ray, "auto", None) == 0.0  # this cluster has no GPU
    with pytest.raises(ConfigError, match="GPUs per Ray task"):
        task_gpus(ray, "cpu", -1)
    with pytest.raises(ConfigError, match="CPUs per Ray task"):
        ray_tasks.run_tasks(len, [("x",)], lambda *a: None, cpus=-1)
