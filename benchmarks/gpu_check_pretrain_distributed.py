"""Multi-GPU check: ``clinadapt pretrain`` under torchrun with NCCL trains what one GPU trains.

Pre-trains SimCLR (tiny ResNet: batch norm in the backbone and projector), DINO (ViT-Tiny) and
MAE (ViT-Tiny) once with ``torchrun --nproc-per-node N`` (one GPU per process, NCCL) and once
as one process on one GPU, then prints, per method, the largest differences of the per-step
losses and of the trained state (backbone, heads, teacher), and the wall time of each. Needs a
node with 2 or more GPUs:

    python benchmarks/gpu_check_pretrain_distributed.py [--gpus N]   # --cpu: 2 CPU processes

The CPU version of this check (gloo, 2 processes, all five methods) is
tests/test_ssl_distributed.py.
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

import torch

RUNS = {
    "simclr": ("tiny-resnet", ["method_options.proj_dim=32"]),
    "dino": ("tiny-vit", ["method_options.out_dim=256", "method_options.local_crops_number=2"]),
    "mae": ("tiny-vit", ["method_options.decoder_dim=64", "method_options.decoder_depth=2"]),
}


def largest_differences(a: Path, b: Path) -> dict[str, float]:
    """Max |a - b| of the per-step losses and of every floating-point tensor of the state."""
    sa = torch.load(a / "checkpoint.pt", weights_only=True)
    sb = torch.load(b / "checkpoint.pt", weights_only=True)
    loss = (torch.tensor(sa["history"]) - torch.tensor(sb["history"])).abs().max()
    weights = max(
        float((sa["model"][k].double() - v.double()).abs().max())
        for k, v in sb["model"].items()
        if v.is_floating_point()
    )
    return {"loss": float(loss), "weights": weights, "steps": int(sa["step"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="rehearse with 2 CPU processes")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        args.gpus = 2
    elif args.gpus < 2:
        sys.exit(f"needs 2 or more GPUs (found {args.gpus}); --cpu rehearses on the CPU")
    work = Path(tempfile.mkdtemp(prefix="clinadapt-ssl-ddp-"))
    env = {**os.environ, "CLINADAPT_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus)]
    where = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    for method, (model, options) in RUNS.items():
        cli = ["-m", "clinadapt.cli", "pretrain", "--method", method, "--model", model]
        cli += ["--data", "clinical-shift", "--max-steps", str(args.steps), "--batch-size", "32"]
        cli += ["--device", device, "--quiet", "--set", "evaluate=false"]
        for o in options:
            cli += ["--set", o]
        times = {}
        for label, cmd in (("ddp", [*launch, *cli]), ("one", [sys.executable, *cli])):
            t = time.perf_counter()
            out = ["--out", f"{method}-{label}"]
            subprocess.run([*cmd, *out], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
            times[label] = time.perf_counter() - t
        diff = largest_differences(work / f"{method}-ddp", work / f"{method}-one")
        print(
            json.dumps(
                {
                    "method": method,
                    "model": model,
                    "device": f"{where} x{args.gpus}",
                    **diff,
                    "wall_s": {k: round(v, 1) for k, v in times.items()},
                }
            )
        )
    print(f"files in {work}")


if __name__ == "__main__":
    main()
