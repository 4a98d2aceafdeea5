"""GPU check of --device auto and --precision (fp32, bf16, fp16 with loss scaling).

Run on a machine with a CUDA GPU (about 2-4 minutes, tiny models, small data):

    python benchmarks/gpu_check_precision.py [--out DIR]

For each precision it fine-tunes tiny-vit (LoRA + head), test-time adapts the result with tent
(source.from the fp32 run) and pre-trains it with SimCLR for a few steps, all with the default
``--device auto``; then it exports the fp32 GPU model with --format timm and reloads it on the
CPU with timm alone. It prints one line per run (device, precision, loss scale, balanced
accuracy, seconds) and exits non-zero when a check fails: a run not on CUDA, a non-finite loss
or metric, fp16 without a loss scale, or an export whose CPU logits differ from the GPU model's.

``--device cpu`` is a dry run of the same script on any machine (fp32 and bf16; fp16 needs a
GPU), so that an import or an argument never fails on the GPU machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: the GPU check (needs CUDA); cpu: a dry run of the script on the CPU",
    )
    args = parser.parse_args()
    dry = args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU visible: this check needs one (--device cpu: dry run)", file=sys.stderr)
        return 2
    from clinadapt.compute import resolve_device
    from clinadapt.config import RunConfig
    from clinadapt.export import export_model
    from clinadapt.fitted import load_fitted
    from clinadapt.runner import run_experiment
    from clinadapt.ssl import make_config, pretrain

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    failures: list[str] = []
    expected = "cpu" if dry else "cuda"
    where = "dry run on the CPU" if dry else f"GPU: {torch.cuda.get_device_name(0)}"
    print(f"{where}; auto resolves to {resolve_device('auto')}")
    device = {"device": "cpu"} if dry else {}  # else the default, auto
    data = {"patients_per_site": 40}
    fp32_record: Path | None = None
    print(f"{'run':34s} {'device':7s} {'prec':5s} {'loss scale':>10s} {'bal.acc':>8s} {'s':>6s}")
    for precision in ("fp32", "bf16") if dry else ("fp32", "bf16", "fp16"):
        t = time.perf_counter()
        rec = run_experiment(
            RunConfig(
                model="tiny-vit",
                target="lora+head",
                method="finetune",
                method_options={"epochs": 3},
                data_options=data,
                precision=precision,
                out_dir=str(out / "runs"),
                **device,
            )
        )
        seconds = time.perf_counter() - t
        acc = rec["summary"]["balanced_accuracy"]["in_domain"]
        scale = rec["training"].get("loss_scale")
        print(
            f"{'finetune lora+head':34s} {rec['compute']['device']:7s} {precision:5s} "
            f"{scale if scale is not None else '-':>10} {acc:8.3f} {seconds:6.1f}"
        )
        if not rec["compute"]["device"].startswith(expected):
            failures.append(f"finetune {precision} ran on {rec['compute']['device']}")
        if not math.isfinite(acc) or any(
            not math.isfinite(h["loss"]) for h in rec["training"]["history"]
        ):
            failures.append(f"finetune {precision}: non-finite loss or metric")
        if precision == "fp16" and not scale:
            failures.append("finetune fp16: no loss scale recorded (GradScaler not used)")
        if precision == "fp32":
            fp32_record = out / "runs" / f"{rec['run_id']}.json"
        t = time.perf_counter()
        tent = run_experiment(
            RunConfig(
                model="tiny-vit",
                method="tent",
                data_options=data,
                precision=precision,
                source={"from": str(fp32_record)},
                out_dir=str(out / "tent"),
                **device,
            )
        )
        acc = tent["summary"]["balanced_accuracy"]["shifted"]
        print(
            f"{'tent (source.from the fp32 run)':34s} {tent['compute']['device']:7s} "
            f"{precision:5s} {'-':>10} {acc:8.3f} {time.perf_counter() - t:6.1f}"
        )
        if not math.isfinite(acc):
            failures.append(f"tent {precision}: non-finite metric")
        if not tent["compute"]["device"].startswith(expected):
            failures.append(f"tent {precision} ran on {tent['compute']['device']}")
        t = time.perf_counter()
        summary = pretrain(
            make_config(
                method="simclr",
                model="tiny-vit",
                data="clinical-shift",
                data_options={"patients_per_site": 10},
                max_steps=5,
                batch_size=32,
                precision=precision,
                evaluate=False,
                out_dir=str(out / f"pt-{precision}"),
                **device,
            )
        )
        print(
            f"{'simclr pre-training, 5 steps':34s} {summary['compute']['device']:7s} "
            f"{precision:5s} {'-':>10} {'-':>8} {time.perf_counter() - t:6.1f}"
        )
        if not math.isfinite(summary["loss_last"]):
            failures.append(f"pretrain {precision}: non-finite loss")
        if not summary["compute"]["device"].startswith(expected):
            failures.append(f"pretrain {precision} ran on {summary['compute']['device']}")

    # the fp32 GPU model, exported, reloads on the CPU in timm alone with the same logits
    import timm

    fitted = load_fitted(fp32_record, device=expected)
    folder = out / "export-timm"
    export_model(fp32_record, "timm", folder)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        gpu = fitted.model.eval()(x.to(expected)).float().cpu()
        cpu = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x)
    diff = (gpu - cpu).abs().max().item()
    print(f"export --format timm, CPU reload vs GPU model: max |logit diff| = {diff:.2e}")
    if diff > 1e-3:
        failures.append(f"export: CPU logits differ from the GPU model's by {diff:.2e}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(
        f"all {'dry-run' if dry else 'GPU'} checks passed"
        if not failures
        else f"{len(failures)} check(s) failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
