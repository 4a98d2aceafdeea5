"""Training in several processes (torchrun, gloo on the CPU) is training in one, split.

Tolerance: N processes average (DistributedDataParallel) the gradients of their parts' weighted
losses where one process takes the whole batch's, so results agree up to the order of float32
sums: per-step losses within 1e-5, and weights within 1e-4 after AdamW, whose normalised steps
magnify differences in gradients near zero (SGD and the cache keys of tip-adapter-f agree within
1e-6).
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

from clinadapt import distributed, runner
from clinadapt.config import RunConfig
from clinadapt.data import load_dataset
from clinadapt.data.loading import batch_chunks
from clinadapt.distributed import ShardSampler, World, ddp_loss, idle_loss, load_shards, wrap
from clinadapt.errors import ConfigError
from clinadapt.methods import METHODS
from clinadapt.methods.finetune import batch_share, check_batches_fill_processes
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
            {
                "model": "tiny-vit",
                "target": "lora+head",  # LoRA factors and the head train, the rest is frozen
                "target_options": {"lora": {"rank": 2}},
                "method": "finetune",
                "method_options": {"epochs": 1},
            },
            {
                "model": "tiny-resnet",  # batch norm over the global batch: as one process
                "method": "finetune",
                "batch_size": 9,  # 41 images: 4 batches of 9 and one of 5, none below 2
                "method_options": {"epochs": 1, "sync_batchnorm": True},
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
    samplers = [ShardSampler(7, 7, shuffle=False, num_replicas=3, rank=r) for r in range(3)]
    assert [s.parts()[0].tolist() for s in samplers] == [[0, 3, 6], [1, 4], [2, 5]]
    last = ShardSampler(9, 4, shuffle=False, num_replicas=2, rank=1)  # batches 4, 4, 1
    assert [p.tolist() for p in last.parts()] == [[1, 3], [5, 7], []]  # none of the last


@pytest.mark.parametrize("size", [1, 2, 3])
def test_shard_sampler_splits_the_batches_one_process_draws(size):
    n, batch = 41, 8
    samplers = [ShardSampler(n, batch, seed=5000, num_replicas=size, rank=r) for r in range(size)]
    assert all(isinstance(s, torch.utils.data.distributed.DistributedSampler) for s in samplers)
    for epoch in (0, 3):
        for s in samplers:
            s.set_epoch(epoch)
        want = batch_chunks(n, batch, shuffle=True, seed=5000 + epoch)  # one process's batches
        for r, s in enumerate(samplers):
            assert [b.tolist() for b in s.global_batches()] == [b.tolist() for b in want]
            for (part, whole), b in zip(s.shards(), want, strict=True):
                assert part.tolist() == b[r::size].tolist() and whole.tolist() == b.tolist()
            mine = list(s)
            assert len(s) == len(mine) == sum(len(b[r::size]) for b in want)
        everyone = np.sort(np.concatenate([list(s) for s in samplers]))
        np.testing.assert_array_equal(everyone, np.arange(n))  # each image once, none padded
    epoch0, epoch1 = ShardSampler(n, batch, seed=5000), ShardSampler(n, batch, seed=5000)
    epoch1.set_epoch(1)  # a new epoch, another order
    assert list(epoch0) != list(epoch1) and sorted(epoch0) == sorted(epoch1)
    with pytest.raises(ConfigError, match="batch_size must be at least 1, got 0"):
        ShardSampler(n, 0)


def test_one_process_loads_whole_batches():
    ds = load_dataset("clinical-shift", patients_per_site=8)
    pp = lambda im: torch.ones(len(im), 1)  # noqa: E731
    sampler = ShardSampler(len(ds), 7, seed=3)
    for ((x, y, pos), batch), want in zip(
        load_shards(ds, pp, sampler, workers=0),
        batch_chunks(len(ds), 7, shuffle=True, seed=3),
        strict=True,
    ):
        np.testing.assert_array_equal(batch, want)
        np.testing.assert_array_equal(pos, want)
        np.testing.assert_array_equal(y.numpy(), ds.labels[want])
        assert x.shape == (len(want), 1)


def test_a_process_without_an_image_gets_the_first_image_to_join_the_step():
    ds = load_dataset("clinical-shift", patients_per_site=8)  # 41 training images
    n = len(ds)
    seen = []
    pp = lambda im: (seen.append(len(im)), torch.ones(len(im), 3, 5, 5))[1]  # noqa: E731
    batch = n - 1  # batches of n - 1 and 1 images: process 1 of 2 has none of the last
    shards = list(load_shards(ds, pp, ShardSampler(n, batch, num_replicas=2, rank=1), workers=0))
    (x0, y0, pos0), whole0 = shards[0]
    assert len(x0) == len(y0) == len(pos0) == batch // 2 and len(whole0) == batch
    (x, y, pos), whole = shards[1]
    assert x.shape == (1, 3, 5, 5) and y.tolist() == ds.labels[whole].tolist()
    assert pos.size == 0 and len(whole) == 1  # no image of its own: it forwards process 0's
    assert seen == [batch // 2, 1]


def test_loss_weights_undo_the_average_over_processes(monkeypatch):
    loss = torch.tensor(2.0)
    assert ddp_loss(loss, 1.0) is loss  # one process: as it is
    monkeypatch.setattr(distributed, "world", lambda: World(1, 4, 1, "gloo"))
    # DDP divides the summed gradients by 4: a quarter of the images weighs 1/4 * 4
    assert ddp_loss(loss, 0.25).item() == pytest.approx(2.0)
    assert ddp_loss(loss, 0.1).item() == pytest.approx(0.8)
    layer = torch.nn.Linear(3, 2)
    zero = idle_loss(layer(torch.ones(1, 3)))
    zero.backward()
    assert zero.item() == 0.0 and not layer.weight.grad.any() and not layer.bias.grad.any()


def test_one_process_trains_the_module_itself():
    layer = torch.nn.Linear(3, 2)
    assert wrap(layer) is layer
    assert World(0, 2, 0, "gloo").describe() == {
        "processes": 2,
        "backend": "gloo",
        "wrapper": "DistributedDataParallel",
    }


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
            part = batch[r::size]  # the positions ShardSampler gives process r
            share = batch_share(labels, "multiclass", part, batch, weight)
            loss = F.cross_entropy(logits[part], y[part], weight=weight, label_smoothing=smoothing)
            total += share * loss.item()
        assert total == pytest.approx(whole.item(), rel=1e-6)
    assert batch_share(labels, "multiclass", batch[:2], batch, None) == pytest.approx(2 / 7)


def test_global_batch_norm_needs_an_image_in_every_process():
    check_batches_fill_processes(41, 9, 2)  # 9, 9, 9, 9, 5
    check_batches_fill_processes(5, 8, 5)  # one batch of 5
    for n, batch, size, smallest in [(41, 8, 2, 1), (41, 9, 6, 5), (3, 8, 4, 3), (40, 2, 3, 2)]:
        with pytest.raises(ConfigError, match=f"a batch of {smallest} image"):
            check_batches_fill_processes(n, batch, size)


def test_only_data_parallel_methods_run_in_several_processes(tmp_path):
    able = sorted(n for n, m in METHODS.load_all().items() if getattr(m, "data_parallel", 0))
    assert able == ["coop", "finetune", "tip-adapter-f"]
    for method in ("finetune", "tent"):  # tent's source model trains with finetune
        check_data_parallel(RunConfig(method=method), METHODS.get(method)())
    for method in ("linear-probe", "tttpp", "zeroshot"):
        with pytest.raises(ConfigError, match=r"train with coop, finetune, tip-adapter-f; run"):
            check_data_parallel(RunConfig(method=method), METHODS.get(method)())


def test_the_few_shot_sweep_refuses_several_processes(tmp_path, monkeypatch):
    from clinadapt.fewshot_sweep import run_fewshot_sweep

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
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
    assert record["compute"]["distributed"] == {
        "processes": 2,
        "backend": "gloo",
        "wrapper": "DistributedDataParallel",
    }
    assert record["training"]["weights"].startswith("cache/fit-")
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOY = """
import json, sys
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from clinadapt.distributed import (
    ShardSampler, backward_part, barrier, decide, everyone, init, world, wrap
)

init("cpu")
torch.manual_seed(0)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(5, 5).requires_grad_(False)
        self.body = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 3)
        self.spare = torch.nn.Linear(4, 3)  # trainable, never reached by the loss

    def forward(self, x):
        h = self.frozen(x).reshape(len(x), -1, 5).mean(1)  # fails on 0 rows, as attention does
        return self.head(torch.tanh(self.body(h)))


module = Net()
if world().rank > 0:  # another start: wrapping gives every process rank 0's
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(11, 5, generator=g), torch.randint(3, (11,), generator=g)
net = wrap(module)
trained = [p for p in module.parameters() if p.requires_grad]
opt = torch.optim.SGD(trained, lr=0.5, momentum=0.9, weight_decay=0.1)  # sees gradient scales
sampler = ShardSampler(11, 5, seed=7)  # batches of 5, 5, 1: process 1 has none of the last
losses = []
for epoch in range(3):
    sampler.set_epoch(epoch)
    for part, batch in sampler.shards():
        opt.zero_grad(set_to_none=True)
        loss = backward_part(net, x, part, batch, lambda o, i: F.cross_entropy(o, y[i]))
        losses.append(loss)
        opt.step()
state = {k: v.contiguous() for k, v in module.state_dict().items()}
save_file(state, f"{sys.argv[1]}-{world().rank}.safetensors")
with open(f"{sys.argv[1]}-{world().rank}.json", "w") as f:
    json.dump({"losses": losses, "wrapped": type(net).__name__, "agree": [
        decide(world().rank == 0), everyone(world().rank == 0), everyone(True)
    ]}, f)
barrier()
del net  # a wrapper alive into interpreter teardown can abort the process (gloo, torch 2.14)
"""


@pytest.mark.slow
def test_ddp_averages_to_the_global_batch_with_an_empty_process_and_an_unused_head(tmp_path):
    """The helpers alone, on a toy module: uneven parts, a process without an image in the last
    batch (the module cannot take zero rows, as many models cannot), a trainable head the loss
    does not reach (weight decay must leave it as one process does), a frozen layer, and
    different starting weights in process 1."""
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    assert _torchrun([str(script), "ddp"], tmp_path).returncode == 0
    one = subprocess.run(
        [sys.executable, str(script), "one"], cwd=tmp_path, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    one = json.loads((tmp_path / "one-0.json").read_text())
    assert one["wrapped"] == "Net" and one["agree"] == [True, True, True]
    start = load_file(tmp_path / "one-0.safetensors")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"ddp-{rank}.json").read_text())
        assert got["wrapped"] == "DistributedDataParallel" and len(got["losses"]) == 9
        assert got["agree"] == [True, False, True]  # rank 0's choice; not true in rank 1
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=0, atol=1e-6)
        weights = load_file(tmp_path / f"ddp-{rank}.safetensors")
        for name, value in weights.items():
            np.testing.assert_allclose(value, start[name], rtol=0, atol=1e-6, err_msg=name)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``args`` in 2 CPU processes under torchrun; fails the test with their error output."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launch, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _compare(ddp: Path, one: Path, run_id: str) -> None:
    a = json.loads((ddp / f"{run_id}.json").read_text())
    b = json.loads((one / f"{run_id}.json").read_text())
    assert a["compute"]["distributed"] == {
        "processes": 2,
        "backend": "gloo",
        "wrapper": "DistributedDataParallel",
    }
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


RERUN = """
import sys
from clinadapt import runner
from clinadapt.cli import main
from clinadapt.distributed import world

load = runner._load_fit


def unreadable_in_process_1(method, model, path, device):
    if world().rank == 1 and path.name == sys.argv[1]:
        return False  # as on a node that cannot read the cache
    return load(method, model, path, device)


runner._load_fit = unreadable_in_process_1
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "out_dir": "ddp"}))
    proc = _torchrun(["-m", "clinadapt.cli", "sweep", str(path), "--no-report", "--json"], tmp_path)
    summary = json.loads(proc.stdout)  # one summary: the other process printed nothing
    assert summary["ran"] == 5 and not summary["failed"]

    from clinadapt.sweep import load_sweep, run_sweep

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = load_sweep(path, out_dir=str(tmp_path / "one"))
        assert len(run_sweep(spec).ran) == 5
    finally:
        torch.set_num_threads(before)
    assert len(list_records(tmp_path / "ddp")) == 5
    for cfg in spec.configs():
        _compare(tmp_path / "ddp", tmp_path / "one", cfg.run_id())

    # interrupted after training the first two runs, before their records: the rerun skips the
    # runs with records and reuses a cached fit, as one process would, only if every process
    # can load it (here process 1 cannot load the LoRA run's: both train it again, alike)
    first, lora = (cfg.run_id() for cfg in spec.configs()[:2])
    lora_fit = json.loads((tmp_path / "ddp" / f"{lora}.json").read_text())["training"]["weights"]
    for run_id in (first, lora):
        (tmp_path / "ddp" / f"{run_id}.json").unlink()
    before = {p.relative_to(tmp_path) for p in (tmp_path / "ddp").rglob("*") if p.is_file()}
    script = tmp_path / "rerun.py"
    script.write_text(RERUN)
    cli = ["sweep", str(path), "--no-report", "--json"]
    again = json.loads(_torchrun([str(script), Path(lora_fit).name, *cli], tmp_path).stdout)
    assert again["ran"] == 2 and again["skipped"] == 3 and not again["failed"]
    reused = json.loads((tmp_path / "ddp" / f"{first}.json").read_text())["training"]
    assert reused["reused"] == Path(reused["weights"]).name
    assert "reused" not in json.loads((tmp_path / "ddp" / f"{lora}.json").read_text())["training"]
    _compare(tmp_path / "ddp", tmp_path / "one", lora)
    after = {p.relative_to(tmp_path) for p in (tmp_path / "ddp").rglob("*") if p.is_file()}
    assert after == before | {Path("ddp") / f"{run_id}.json" for run_id in (first, lora)}
