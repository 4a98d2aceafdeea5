"""Pre-training in several processes (torchrun, gloo on the CPU) is pre-training in one, split.

Tolerance: the processes reduce the global batch's sums (negatives, centre, batch-norm
statistics, gradients) in another order than one process. The first step's losses agree within
1e-5 (relative; measured 2e-6 for SimCLR-3D at temperature 0.1, at most 3e-7 for the others);
the weights within 1e-4 after AdamW, whose normalised steps magnify float32 differences in
gradients near zero; so later losses within 5e-5 (relative; measured 1.3e-5 for SimCLR-3D).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clinadapt.distributed import World
from clinadapt.errors import ConfigError
from clinadapt.models import load_model
from clinadapt.ssl import make_config, pretrain
from clinadapt.ssl.augment import Augmenter, policy_for_modality
from clinadapt.ssl.collective import (
    GlobalBatchNorm,
    batch_places,
    gather_batch,
    global_batchnorm,
    global_sum,
    local_batchnorm,
    share,
)
from clinadapt.ssl.draws import ImageDraws, image_seed
from clinadapt.ssl.mae import random_masking
from clinadapt.ssl.parallel import check_batch, my_places, process_seed, stop_together
from clinadapt.ssl.volume import cube_mask, intensity_jitter, random_axis_flips, random_box_crop


@pytest.mark.parametrize("modality", ["xray", "dermoscopy", "histology"])
def test_a_part_of_the_batch_draws_the_views_the_whole_batch_draws(modality):
    # process 1 of 2 holds places 1, 3, 5 of a global batch of 6: its views of those images
    # are rows 1, 3, 5 of the views one process draws for the whole batch
    x = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    aug = Augmenter(policy_for_modality(modality), (0.5,) * 3, (0.25,) * 3)
    places = my_places(6, World(1, 2))
    assert places.tolist() == [1, 3, 5]
    whole = ImageDraws.for_batch(3, 7, range(6))
    part = ImageDraws.for_batch(3, 7, places)
    for _ in range(2):  # two views per image, drawn one after the other (SimCLR, DINO)
        torch.testing.assert_close(
            aug.view(x[places], 24, (0.3, 1.0), part), aug.view(x, 24, (0.3, 1.0), whole)[places]
        )
    _, _, mask = random_masking(16, 0.75, ImageDraws.for_batch(3, 7, places))
    _, _, whole_mask = random_masking(16, 0.75, ImageDraws.for_batch(3, 7, range(6)))
    assert torch.equal(mask, whole_mask[places])
    with pytest.raises(ValueError, match="3 image generators for a batch of 6"):
        aug.view(x, 24, (0.3, 1.0), part)


def test_a_part_of_a_volume_batch_draws_its_own_3d_views_and_masks():
    x = torch.rand(5, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    places = np.array([0, 3])

    def views(batch, gen):
        return intensity_jitter(
            random_axis_flips(random_box_crop(batch, (8, 8, 8), (0.35, 1.0), gen), gen), gen
        )

    whole = views(x, ImageDraws.for_batch(1, 2, range(5)))
    torch.testing.assert_close(views(x[places], ImageDraws.for_batch(1, 2, places)), whole[places])
    m = cube_mask((8, 8, 8), 4, 0.75, ImageDraws.for_batch(1, 2, places))
    assert torch.equal(
        m, cube_mask((8, 8, 8), 4, 0.75, ImageDraws.for_batch(1, 2, range(5)))[places]
    )


def test_image_seeds_are_distinct_and_reproducible():
    seeds = {image_seed(s, t, p) for s in range(3) for t in range(3) for p in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    a = ImageDraws.for_batch(0, 4, [2, 5]).rand(3)
    b = ImageDraws.for_batch(0, 4, [5]).rand(3)
    assert a.shape == (2, 3) and torch.equal(a[1], b[0])
    assert torch.equal(ImageDraws.seeded(9, 4).randn(2, 2), ImageDraws.seeded(9, 4).randn(2, 2))
    assert ImageDraws([]).rand(3).shape == (0, 3)


def test_one_process_collectives_are_the_identity():
    x = torch.randn(4, 3)
    assert gather_batch(x) is x and global_sum(x) is x
    places, n = batch_places(4)
    assert places.tolist() == [0, 1, 2, 3] and n == 4
    loss = torch.tensor(2.5)
    assert share(loss, 7).item() == 2.5  # a process holding the whole batch: all of the loss
    assert not stop_together(False, World()) and stop_together(True, World())


@pytest.mark.parametrize("dims", [2, 4, 5])
def test_global_batch_norm_is_batch_norm_in_one_process(dims):
    cls = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[dims]
    ref = cls(3, momentum=0.2)
    model = torch.nn.Sequential(torch.nn.Identity(), cls(3, momentum=0.2))
    model[1].load_state_dict(ref.state_dict())
    weight = model[1].weight
    global_batchnorm(model)
    assert isinstance(model[1], GlobalBatchNorm) and model[1].weight is weight
    assert set(model[1].state_dict()) == set(ref.state_dict())
    x = torch.randn(6, 3, *[4] * (dims - 2))
    torch.testing.assert_close(model(x), ref(x))
    torch.testing.assert_close(model[1].running_var, ref.running_var)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x))
    local_batchnorm(model)  # back to the library's class, with the same tensors
    assert type(model[1]) is cls and model[1].weight is weight and not model[1].training
    torch.testing.assert_close(model(x), ref(x))


def test_a_batch_smaller_than_the_processes_is_refused():
    check_batch(2, World(1, 2))
    with pytest.raises(ConfigError, match=r"batch size 3 is smaller than the 4 processes"):
        check_batch(3, World(0, 4))
    assert my_places(5, World(0, 2)).tolist() == [0, 2, 4]
    assert process_seed(0, 1) != process_seed(0, 2) != process_seed(1, 1)


def test_one_process_summary_says_nothing_of_processes(tmp_path):
    s = pretrain(
        make_config(
            model="tiny-vit",
            method="mae",
            method_options={"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
            data_options={"patients_per_site": 8},
            max_steps=1,
            batch_size=4,
            out_dir=str(tmp_path),
            evaluate=False,
        )
    )
    assert "distributed" not in s["compute"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "rng" in state and "rng_by_process" not in state
    assert load_model("tiny-vit", weights=s["weights"]) is not None


# --- two processes against one ------------------------------------------------------------

COMMON = {"max_steps": 3, "checkpoint_every": 2, "evaluate": False, "eval_baseline": False}
DATA_2D = {"data_options": {"patients_per_site": 8}, "batch_size": 5}  # splits 3 / 2
DATA_3D = {
    "data": "clinical-shift-3d",
    "data_options": {"patients_per_site": 5},
    "model": "tiny-resenc",
    "model_options": {"volume_size": 16},
    "batch_size": 3,  # splits 2 / 1
}
DINO = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2}
RUNS = {
    # simclr with its evaluation: process 0 alone evaluates and writes the summary
    "simclr": {"model": "tiny-vit", "method_options": {"proj_dim": 16}, "evaluate": True},
    # a ResNet: batch norm in the backbone, the projector and DINO's teacher
    "dino": {"model": "tiny-resnet", "method_options": DINO},
    "mae": {
        "model": "tiny-vit",
        "method_options": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    },
    "mae-3d": {"method_options": {"mask_patch": 8}, **DATA_3D},
    "simclr-3d": {"method_options": {"proj_dim": 8}, **DATA_3D},
}

# Each process pre-trains every run in turn; process r > 0 writes to its own --out (as on
# another node without a shared file system), which must stay empty. A run with crash_at is
# interrupted after that step (after the checkpoint before it) in every process; a run that
# fails writes its error next to its --out, per process.
DRIVER = """
import json, os, sys
from pathlib import Path
import torch
from clinadapt.errors import ConfigError
from clinadapt.ssl import SSL_METHODS, make_config, pretrain

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
for fields in json.loads(open(sys.argv[1]).read()):
    crash = fields.pop("crash_at", None)
    if rank:
        fields["out_dir"] += f"-rank{rank}"
    cls = SSL_METHODS.get(fields["method"])
    original = cls.after_step

    def after(self, step, total, original=original, crash=crash):
        if step == crash:
            raise KeyboardInterrupt
        original(self, step, total)

    cls.after_step = after
    try:
        pretrain(make_config(**fields))
    except KeyboardInterrupt:
        pass
    except ConfigError as e:
        Path(fields["out_dir"] + ".error").write_text(str(e))
    finally:
        cls.after_step = original
"""


def _config(name: str, out: Path, **extra) -> dict:
    fields = {"method": name.removesuffix("-cut"), **COMMON, **DATA_2D, **RUNS[name]}
    return {**fields, "out_dir": str(out), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, runs: list[dict]) -> None:
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-port", str(_free_port()), "driver.py", "runs.json"]
    proc = subprocess.run(
        launch,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _compare(a: Path, b: Path, processes: int = 2) -> None:
    sa = torch.load(a / "checkpoint.pt", weights_only=True)
    sb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert sa["step"] == sb["step"] == COMMON["max_steps"]
    np.testing.assert_allclose(sa["history"][0], sb["history"][0], rtol=1e-5, err_msg=str(a))
    np.testing.assert_allclose(sa["history"], sb["history"], rtol=5e-5, err_msg=str(a))
    assert sa["model"].keys() == sb["model"].keys()
    for k, v in sb["model"].items():
        np.testing.assert_allclose(
            sa["model"][k].double(), v.double(), rtol=0, atol=1e-4, err_msg=f"{a}: {k}"
        )
    assert len(sa.get("rng_by_process", [None])) == processes and "rng_by_process" not in sb


@pytest.mark.slow
def test_two_processes_pretrain_as_one_and_resume(tmp_path):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    runs = [_config(name, ddp / name) for name in RUNS]
    runs.append(_config("dino", ddp / "dino-cut", crash_at=2))
    # process 0's clock decides when time is up, for all; process 0's unreadable checkpoint
    # is an error in every process (none waits for the others forever)
    runs.append(_config("mae", ddp / "mae-timed", max_minutes=1e-9))
    (ddp / "mae-bad").mkdir(parents=True)
    (ddp / "mae-bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    runs.append(_config("mae", ddp / "mae-bad"))
    _torchrun(tmp_path, runs)
    timed = json.loads((ddp / "mae-timed" / "summary.json").read_text())
    assert timed["stopped_by_time"] and timed["steps"] == 0
    for out in ("mae-bad", "mae-bad-rank1"):
        assert "cannot read the checkpoint" in (ddp / f"{out}.error").read_text()
    cut = torch.load(ddp / "dino-cut" / "checkpoint.pt", weights_only=True)
    assert cut["step"] == 2  # interrupted in the third step, after the step-2 checkpoint
    shutil.copytree(ddp / "dino-cut", tmp_path / "dino-cut-alone")
    _torchrun(tmp_path, [_config("dino", ddp / "dino-cut")])  # the rerun resumes

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in RUNS:
            pretrain(make_config(**_config(name, one / name)))
    finally:
        torch.set_num_threads(before)
    for name in RUNS:
        _compare(ddp / name, one / name)
        assert not [p for p in (ddp / f"{name}-rank1").rglob("*") if p.is_file()]
    _compare(ddp / "dino-cut", one / "dino")
    # the checkpoint of two processes resumes in one: the global batch decides what is trained
    pretrain(make_config(**_config("dino", tmp_path / "dino-cut-alone")))
    _compare(tmp_path / "dino-cut-alone", one / "dino", processes=1)
    summary = json.loads((ddp / "simclr" / "summary.json").read_text())
    assert summary["compute"]["distributed"] == {
        "processes": 2,
        "backend": "gloo",
        "wrapper": "DistributedDataParallel",
    }
    alone = json.loads((one / "simclr" / "summary.json").read_text())
    assert summary["eval"]["linear_probe"]["balanced_accuracy"] == pytest.approx(
        alone["eval"]["linear_probe"]["balanced_accuracy"], abs=0.02
    )
    for name in RUNS:  # process 0 wrote the exported backbone and the summary of every run
        assert (ddp / name / "summary.json").is_file()
        assert list((ddp / name).glob("backbone*"))
