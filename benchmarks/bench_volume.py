"""3D backbones: speed and memory, measured side by side in one run.

    python benchmarks/bench_volume.py [--models tiny-resenc,tiny-stunet,tiny-primus,tiny-swinunetr]
        [--patch N] [--batch 2] [--repeats 3] [--threads 1] [--device cpu] [--published]

Per backbone, at a stated patch size (``--patch``, default each model's own ``volume_size``):

1. Inference: volumes per second of the encoder (classification features) and of encoder +
   decoder (segmentation logits), batch ``--batch``, no gradients.
2. Fine-tuning: volumes per second of one training step of encoder + decoder (Dice + CE loss,
   backward, AdamW step) and its peak memory (CUDA ``max_memory_allocated`` above the loaded
   model; on CPU the process's peak resident memory above it, ``/proc/self/status`` VmHWM after
   a reset), each model in its own process.
3. Sliding windows: MONAI ``sliding_window_inference`` of a volume twice the patch side per axis
   (8 patches' worth of voxels, overlap 0.5) against one whole-volume pass of the same network
   at that size, where the architecture runs at any size (CNNs); the ratio is the overhead.

``--published`` adds the published sizes (resenc-l, stunet-s/b/l, primus-s/m/l, swinunetr) with
random weights, at their published patch (``--patch`` shrinks them, same widths and depths);
meant for a GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from clinadapt.methods.seg3d import SlidingWindow, VolumeSegmenter
from clinadapt.models import load_model

TINY = "tiny-resenc,tiny-stunet,tiny-primus,tiny-swinunetr"
PUBLISHED = "resenc-l,stunet-s,stunet-b,stunet-l,primus-s,primus-m,primus-l,swinunetr"
ANY_SIZE = ("resenc", "stunet")  # fully convolutional: one pass at any multiple of the stride


def build(name: str, args) -> VolumeSegmenter:
    opts = {"volume_size": args.patch} if args.patch else {}
    torch.manual_seed(0)
    model = load_model(name, pretrained=False, **opts)
    return VolumeSegmenter(model, 2).to(args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def train_step(seg: VolumeSegmenter, x: torch.Tensor, y: torch.Tensor, opt, loss_fn) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(seg(x), y).backward()
    opt.step()


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_memory(name: str, args, queue) -> None:
    from monai.losses import DiceCELoss

    torch.set_num_threads(args.threads)
    seg = build(name, args).train()
    x = torch.randn(args.batch, 1, *seg.roi, device=args.device)
    y = torch.randint(0, 3, (args.batch, 1, *seg.roi), device=args.device)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    train_step(seg, x, y, opt, loss_fn)  # optimiser state allocated
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(seg, x, y, opt, loss_fn)
        torch.cuda.synchronize()
        queue.put(torch.cuda.max_memory_allocated() - base)
        return
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    train_step(seg, x, y, opt, loss_fn)
    queue.put(_status("VmHWM") - base)


def peak_memory(name: str, args) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory, args=(name, args, queue))
    proc.start()
    value = queue.get(timeout=3600)
    proc.join()
    return int(value)


def bench(name: str, args) -> dict:
    from monai.losses import DiceCELoss

    seg = build(name, args)
    roi = seg.roi
    x = torch.randn(args.batch, 1, *roi, device=args.device)
    row: dict = {"model": name, "patch": "x".join(map(str, roi)), "batch": args.batch}
    row["parameters_M"] = sum(p.numel() for p in seg.volume.parameters()) / 1e6
    seg.eval()
    with torch.no_grad():
        enc = timed(lambda: seg.volume.encode_image(x), args.device, args.repeats)
        full = timed(lambda: seg(x), args.device, args.repeats)
    row["encode_vol_s"] = args.batch / enc
    row["segment_vol_s"] = args.batch / full
    seg.train()
    y = torch.randint(0, 3, (args.batch, 1, *roi), device=args.device)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    step = timed(lambda: train_step(seg, x, y, opt, loss_fn), args.device, args.repeats)
    row["train_vol_s"] = args.batch / step
    row["train_peak_MiB"] = peak_memory(name, args) / 2**20
    seg.eval()
    big = torch.randn(1, 1, *(2 * s for s in roi), device=args.device)
    sw = SlidingWindow(overlap=0.5, sw_batch_size=args.batch)
    with torch.no_grad():
        windows = timed(lambda: seg.logits(big, sw), args.device, args.repeats)
        row["sliding_s"] = windows
        if seg.volume.arch.config().get("arch") in ANY_SIZE:
            one = timed(lambda: seg(big), args.device, args.repeats)
            row["one_pass_s"] = one
            row["sliding_over_one_pass"] = windows / one
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=TINY)
    ap.add_argument("--published", action="store_true", help="add the published sizes")
    ap.add_argument("--patch", type=int, default=None, help="patch side (default: the model's)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") + (PUBLISHED.split(",") if args.published else [])
    print(f"device {args.device}, {args.threads} thread(s), batch {args.batch}")
    keys = (
        "model",
        "patch",
        "parameters_M",
        "encode_vol_s",
        "segment_vol_s",
        "train_vol_s",
        "train_peak_MiB",
        "sliding_s",
        "one_pass_s",
        "sliding_over_one_pass",
    )
    print(" | ".join(keys))
    for name in names:
        row = bench(name, args)
        print(
            " | ".join(
                f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "-"))
                for k in keys
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
