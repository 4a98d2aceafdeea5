"""Training in several processes (torchrun, gloo on the CPU) is training in one, split.

Tolerance: N processes sum their parts' gradients where one process sums the whole batch's, so
results agree up to the order of float32 sums: per-step losses within 1e-5, and weights within
1e-4 after AdamW, whose normalised steps magnify differences in gradients near zero (SGD and the
cache keys of tip-adapter-f agree within 1e-6).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.numpy import load_file

from clinadapt import runner
from clinadapt.config import RunConfig
from clinadapt.data import load_dataset
from clinadapt.data.loading import batch_chunks
from clinadapt.distributed import World, my_part, split_batches
from clinadapt.errors import ConfigError
from clinadapt.methods import METHODS
from clinadapt.methods.finetune import batch_share
from clinadapt.runner import check_data_parallel, run_experiment
from clinadapt.store import list_records

SWEEP = {
    "base": {
        "data_options": {"patients_per_site": 8},
        "shift": "none",
        "batch_size": 8,  # 41 training images: the last batch of 1 leaves process 1 empty
        "evaluation": {"n_boot": 20},
    },
    "grid": {
        "methods": [
            {
                "model": "tiny-vit",
                "method": "finetune",
                "method_options": {"epochs": 2, "class_balanced": True},
            },
            {"model": "tiny-clip", "method": "coop", "method_options": {"epochs": 3}},
            {
                "model": "tiny-clip",
                "method": "tip-adapter-f",
                "method_options": {"epochs": 3, "batch_size": 7},  # splits 4/3, 3/3
            },
        ]
    },
}


def test_batch_chunks_are_the_batches_a_dataset_yields():
    ds = load_dataset("clinical-shift", patients_per_site=8)
    got = [pos for _, _, pos in ds.batches(lambda im: torch.zeros(len(im)), 7, shuffle=True)]
    want = batch_chunks(len(ds), 7, shuffle=True)
    assert len(got) == len(want) == -(-len(ds) // 7)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(np.sort(np.concatenate(want)), np.arange(len(ds)))
    assert len(batch_chunks(10, 4, drop_last=True)) == 2 and batch_chunks(0, 4) == []


def test_processes_split_each_global_batch_once():
    batch = np.array([5, 9, 2, 7, 3, 8, 1])
    parts = [my_part(batch, World(r, 3)) for r in range(3)]
    assert [p.tolist() for p in parts] == [[5, 7, 1], [9, 3], [2, 8]]
    assert my_part(np.array([4]), World(1, 2)).size == 0  # a short last batch may leave one out


def test_one_process_gets_whole_batches():
    ds = load_dataset("clinical-shift", patients_per_site=8)
    pp = lambda im: torch.ones(len(im), 1)  # noqa: E731
    for (part, batch), want in zip(
        split_batches(ds, pp, 7, shuffle=True, seed=3, workers=0),
        batch_chunks(len(ds), 7, shuffle=True, seed=3),
        strict=True,
    ):
        np.testing.assert_array_equal(batch, want)
        np.testing.assert_array_equal(part[2], want)
        np.testing.assert_array_equal(part[1].numpy(), ds.labels[want])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_shares_recover_the_class_weighted_mean_loss(smoothing):
    gen = torch.Generator().manual_seed(0)
    labels = np.array([0, 2, 2, 1, 0, 2, 2])
    logits = torch.randn(len(labels), 3, generator=gen)
    weight = torch.tensor([0.5, 2.0, 1.25])
    batch = np.arange(len(labels))
    y = torch.as_tensor(labels)
    whole = F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
    for size in (2, 3):
        total = 0.0
        for r in range(size):
            part = my_part(batch, World(r, size))
            share = batch_share(labels, "multiclass", part, batch, weight)
            loss = F.cross_entropy(logits[part], y[part], weight=weight, label_smoothing=smoothing)
            total += share * loss.item()
        assert total == pytest.approx(whole.item(), rel=1e-6)
    assert batch_share(labels, "multiclass", batch[:2], batch, None) == pytest.approx(2 / 7)


def test_only_data_parallel_methods_run_in_several_processes(tmp_path):
    able = sorted(n for n, m in METHODS.load_all().items() if getattr(m, "data_parallel", 0))
    assert able == ["coop", "finetune", "tip-adapter-f"]
    for method in ("finetune", "tent"):  # tent's source model trains with finetune
        check_data_parallel(RunConfig(method=method), METHODS.get(method)())
    for method in ("linear-probe", "tttpp", "zeroshot"):
        with pytest.raises(ConfigError, match=r"train with coop, finetune, tip-adapter-f; run"):
            check_data_parallel(RunConfig(method=method), METHODS.get(method)())


def test_pretrain_and_the_few_shot_sweep_refuse_several_processes(tmp_path, monkeypatch):
    from clinadapt.fewshot_sweep import run_fewshot_sweep
    from clinadapt.ssl.config import PretrainConfig
    from clinadapt.ssl.trainer import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(ConfigError, match="clinadapt pretrain runs as one process"):
        pretrain(PretrainConfig(method="simclr", model="tiny-vit", out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="clinadapt fewshot runs as one process"):
        run_fewshot_sweep(RunConfig(out_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir())


def test_processes_other_than_rank_0_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "process_world", lambda: World(1, 2, 1, "gloo"))  # rank 1 of 2
    cfg = RunConfig(
        data_options={"patients_per_site": 8},
        shift="none",
        method="finetune",
        method_options={"epochs": 1},
        evaluation={"n_boot": 20},
        out_dir=str(tmp_path),
    )
    record = run_experiment(cfg)
    assert record["compute"]["distributed"] == {"processes": 2, "backend": "gloo"}
    assert record["training"]["weights"].startswith("cache/fit-")
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(ddp: Path, one: Path, run_id: str) -> None:
    a = json.loads((ddp / f"{run_id}.json").read_text())
    b = json.loads((one / f"{run_id}.json").read_text())
    assert a["compute"]["distributed"] == {"processes": 2, "backend": "gloo"}
    assert "distributed" not in b["compute"]
    la = [row["loss"] for row in a["training"]["history"]]
    lb = [row["loss"] for row in b["training"]["history"]]
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-5, err_msg=run_id)
    wa = load_file(ddp / a["training"]["weights"])
    wb = load_file(one / b["training"]["weights"])
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=0, atol=1e-4, err_msg=name)
    pa = np.load(ddp / "predictions" / f"{run_id}.npz")
    pb = np.load(one / "predictions" / f"{run_id}.npz")
    for name in pa.files:
        if pa[name].dtype.kind in "USO":  # metadata beside the predictions (patient ids, keys)
            np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
        else:
            np.testing.assert_allclose(pa[name], pb[name], rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "out_dir": "ddp"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-port", str(_free_port()), "-m", "clinadapt.cli"]
    proc = subprocess.run(
        [*launch, "sweep", str(path), "--no-report", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one summary: the other process printed nothing
    assert summary["ran"] == 3 and not summary["failed"]

    from clinadapt.sweep import load_sweep, run_sweep

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = load_sweep(path, out_dir=str(tmp_path / "one"))
        assert len(run_sweep(spec).ran) == 3
    finally:
        torch.set_num_threads(before)
    assert len(list_records(tmp_path / "ddp")) == 3
    for cfg in spec.configs():
        _compare(tmp_path / "ddp", tmp_path / "one", cfg.run_id())
