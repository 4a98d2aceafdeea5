"""GPU check of segmentation runs: fine-tuning, the U-Net baseline and test-time adaptation on CUDA.

Run on a machine with a CUDA GPU (about 2-3 minutes, tiny models, the built-in data):

    python benchmarks/gpu_check_segmentation.py [--out DIR]

For each precision (fp32, bf16, fp16 with loss scaling) it fine-tunes tiny-sam with MedSAM's
recipe (seg-finetune), trains the U-Net baseline from scratch, and test-time adapts the U-Net with
intent, all with the default ``--device auto`` on the built-in clinical-shift-seg data. It prints
one line per run (device, precision, loss scale, Dice over present objects on site A and the
shifted mean, seconds) and exits non-zero when a check fails: a run not on CUDA, a non-finite
loss or metric, fp16 training without a loss scale, or a bf16/fp16 run whose site-A Dice is more
than 0.1 from the fp32 run's (reduced precision must not change what is learnt this much).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNS = (
    ("seg-finetune", {"method_options": {"epochs": 10, "lr": 1e-3}}),
    ("unet", {"method_options": {"epochs": 10, "norm": "batch"}}),
    (
        "intent",
        {"source": {"method": "unet", "options": {"epochs": 10, "norm": "batch"}}},
    ),
)
SHIFTED = ("site-b", "site-c", "site-d")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: this check needs one", file=sys.stderr)
        return 2
    from clinadapt.compute import resolve_device
    from clinadapt.config import load_config
    from clinadapt.runner import run_experiment

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-seg-"))
    failures: list[str] = []
    print(f"GPU: {torch.cuda.get_device_name(0)}; auto resolves to {resolve_device('auto')}")
    print(
        f"{'run':14s} {'device':7s} {'prec':5s} {'loss scale':>10s} {'Dice A':>7s} "
        f"{'shifted':>8s} {'s':>6s}"
    )
    reference: dict[str, float] = {}
    for precision in ("fp32", "bf16", "fp16"):
        for method, extra in RUNS:
            t = time.perf_counter()
            cfg = load_config(
                None,
                method=method,
                shift="domain",
                shift_options={"source": "site-a"},
                evaluation={"n_boot": 0},
                precision=precision,
                out_dir=str(out / precision),
                **extra,
            )
            rec = run_experiment(cfg)
            seconds = time.perf_counter() - t
            training = rec.get("training") or (rec.get("source") or {}).get("training") or {}
            scale = training.get("loss_scale")
            a = rec["metrics"]["site-a"]["dice_present"]
            shifted = sum(rec["metrics"][s]["dice_present"] for s in SHIFTED) / len(SHIFTED)
            device = rec["compute"]["device"]
            print(
                f"{method:14s} {device:7s} {precision:5s} {scale or '-':>10} {a:7.3f} "
                f"{shifted:8.3f} {seconds:6.1f}"
            )
            if not device.startswith("cuda"):
                failures.append(f"{method} {precision}: ran on {device}, not CUDA")
            if not (math.isfinite(a) and math.isfinite(shifted)):
                failures.append(f"{method} {precision}: a non-finite Dice")
            losses = [h.get("loss") for h in training.get("history", [])]
            if any(v is not None and not math.isfinite(v) for v in losses):
                failures.append(f"{method} {precision}: a non-finite training loss")
            if precision == "fp16" and "reused" not in training and scale is None:
                failures.append(f"{method} fp16: trained without a loss scale")
            if precision == "fp32":
                reference[method] = a
            elif abs(a - reference[method]) > 0.1:
                failures.append(
                    f"{method} {precision}: site-A Dice {a:.3f} vs fp32 {reference[method]:.3f}"
                )
    for f in failures:
        print("FAILED:", f, file=sys.stderr)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
