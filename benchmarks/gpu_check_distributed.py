"""Multi-GPU check: training under torchrun (DistributedDataParallel, NCCL) trains what one GPU
trains.

Runs a sweep (finetune of ViT-Tiny, in full and with LoRA, coop and tip-adapter-f on a tiny
CLIP, and finetune of a tiny ResNet whose BatchNorm sees each process's part of the batch, or
the global batch with ``sync_batchnorm``) once with ``torchrun --nproc-per-node N`` (one GPU per
process, NCCL) and once as one process on one GPU, then prints, per run, the largest differences
of the per-epoch losses, the trained weights and the test probabilities, and the wall time of
each. The batches split unevenly (the last one is short). Exits with status 1 when a run (but
the ResNet with per-process BatchNorm) differs by more than the tolerances (losses 1e-4, weights
and probabilities 1e-3: GPU sums are less reproducible than the CPU's, whose test asks for 1e-5
and 1e-4) or a record does not say it trained with DistributedDataParallel in N processes.
Needs a node with 2 or more GPUs:

    python benchmarks/gpu_check_distributed.py [--gpus N]   # --cpu: a 2-process CPU rehearsal

The CPU version of this check (gloo, 2 processes) is tests/test_distributed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.numpy import load_file

SWEEP = {
    "base": {
        "data_options": {"patients_per_site": 30},
        "shift": "none",
        "batch_size": 13,  # 150 training images: 11 batches of 13, then 7 (uneven for N >= 2)
        "device": "cuda",
        "evaluation": {"n_boot": 20},
    },
    "grid": {
        "methods": [
            {"model": "tiny-vit", "method": "finetune", "method_options": {"epochs": 3}},
            {
                "model": "tiny-vit",
                "target": "lora+head",
                "method": "finetune",
                "method_options": {"epochs": 3},
            },
            {  # BatchNorm over each process's part of the batch: differs from one GPU
                "model": "tiny-resnet",
                "method": "finetune",
                "method_options": {"epochs": 3},
            },
            {  # BatchNorm over the global batch: as one GPU
                "model": "tiny-resnet",
                "method": "finetune",
                "batch_size": 17,  # 8 batches of 17, then 14: an image per process up to 14
                "method_options": {"epochs": 3, "sync_batchnorm": True},
            },
            {"model": "tiny-clip", "method": "coop", "method_options": {"epochs": 5}},
            {"model": "tiny-clip", "method": "tip-adapter-f", "method_options": {"epochs": 5}},
        ]
    },
}


TOLERANCE = {"loss": 1e-4, "weights": 1e-3, "probs": 1e-3}


def largest_differences(a: Path, b: Path, name: str) -> dict[str, object]:
    """Max |a - b| of the losses, weights and probabilities of the record ``name``."""
    ra, rb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
    la = np.array([row["loss"] for row in ra["training"]["history"]])
    lb = np.array([row["loss"] for row in rb["training"]["history"]])
    wa, wb = load_file(a / ra["training"]["weights"]), load_file(b / rb["training"]["weights"])
    pa = np.load(a / "predictions" / name.replace(".json", ".npz"))
    pb = np.load(b / "predictions" / name.replace(".json", ".npz"))
    return {
        "run": name.removesuffix(".json"),
        "distributed": ra["compute"].get("distributed"),
        "loss": float(np.abs(la - lb).max()),
        "weights": max(float(np.abs(wa[k] - wb[k].astype(np.float64)).max()) for k in wa),
        "probs": max(
            float(np.abs(pa[k] - pb[k]).max()) for k in pa.files if k.startswith("probs/")
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--cpu", action="store_true", help="rehearse with 2 CPU processes")
    args = parser.parse_args()
    if args.cpu:
        args.gpus, SWEEP["base"]["device"] = 2, "cpu"
    elif args.gpus < 2:
        sys.exit(f"needs 2 or more GPUs (found {args.gpus}); --cpu rehearses on the CPU")
    work = Path(tempfile.mkdtemp(prefix="clinadapt-ddp-"))
    (work / "sweep.yaml").write_text(yaml.safe_dump({**SWEEP, "out_dir": "ddp"}))
    cli = ["-m", "clinadapt.cli", "sweep", "sweep.yaml", "--no-report", "--quiet"]
    env = {**os.environ, "CLINADAPT_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus)]
    times = {}
    for label, cmd in (
        ("ddp", [*launch, *cli]),
        ("one", [sys.executable, *cli, "--out", "one"]),
    ):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=work, env=env, check=True)
        times[label] = time.perf_counter() - t
    where = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    print(
        f"{where} x{args.gpus}; wall: {args.gpus} processes {times['ddp']:.1f} s, one process "
        f"{times['one']:.1f} s (tiny models: start-up bound)"
    )
    local_bn = {  # the run whose BatchNorm sees each process's part
        json.loads(rec.read_text())["run_id"]
        for rec in (work / "one").glob("*.json")
        if json.loads(rec.read_text())["model"]["name"] == "tiny-resnet"
        and not json.loads(rec.read_text())["method"]["options"].get("sync_batchnorm")
    }
    wrong = []
    for rec in sorted((work / "ddp").glob("*.json")):
        diff = largest_differences(work / "ddp", work / "one", rec.name)
        print(json.dumps(diff))
        ddp = {"processes": args.gpus, "wrapper": "DistributedDataParallel"}
        if not ddp.items() <= (diff["distributed"] or {}).items():
            wrong.append(f"{diff['run']}: not trained by DDP in {args.gpus} processes")
        batchnorm = diff["run"] in local_bn  # differs by design (see README)
        over = [k for k, tol in TOLERANCE.items() if diff[k] > tol]
        if over and not batchnorm:
            wrong.append(f"{diff['run']}: {', '.join(over)} beyond {TOLERANCE}")
    print(f"files in {work}")
    if wrong:
        sys.exit("\n".join(wrong))
    print("all runs within tolerance")


if __name__ == "__main__":
    main()
