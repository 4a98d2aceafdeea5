"""tiny-resnet's stem, side by side: the registered model against the configuration it had
before (timm's default 7x7 stem is 64 channels wide whatever ``stem_width`` says), against a
16-channel 7x7 stem built by hand (what the description promised), and against itself with
torch's NCHW max pool instead of the channels-last one clinadapt swaps in on the CPU
(``clinadapt.models.pooling``; the same values).

Prints the forward and training-step time of a batch of 32 images of 64x64 for each, interleaved
round by round (the best round counts), and their ratios.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_tiny_resnet.py [--rounds 20] [--device cpu]``
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from torch import nn

from clinadapt.models import load_model
from clinadapt.models.pooling import channels_last_pooling

BODY = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "num_classes": 0}


def before() -> nn.Module:
    """The old registration: ``stem_width=16`` without a deep stem (a 3->64 7x7 stem)."""
    m = timm.create_model("resnet18", pretrained=False, stem_width=16, **BODY)
    channels_last_pooling(m)  # as load_model does: the stems are compared, not the pools
    return m


def hand_built() -> nn.Module:
    """A 3->16 7x7 stem feeding the 16-channel first stage directly (no projection)."""
    m = before()
    m.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(16)
    m.layer1[0].conv1 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
    m.layer1[0].downsample = None
    return m


def nchw_pool() -> nn.Module:
    """The registered model with torch's own ``nn.MaxPool2d`` back in place."""
    m = load_model("tiny-resnet").image_encoder
    p = m.maxpool
    m.maxpool = nn.MaxPool2d(p.kernel_size, p.stride, p.padding, ceil_mode=p.ceil_mode)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    models = {
        "tiny-resnet (deep stem 8-8-16)": load_model("tiny-resnet").image_encoder,
        "before (7x7 stem, 64 channels)": before(),
        "hand-built 7x7 stem, 16 channels": hand_built(),
        "tiny-resnet, NCHW max pool": nchw_pool(),
    }
    x = torch.randn(32, 3, 64, 64, device=args.device)
    best = {k: [float("inf"), float("inf")] for k in models}
    for m in models.values():
        m.to(args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for r in range(args.rounds + 1):  # round 0 warms up
        for name, m in models.items():
            m.eval()
            with torch.no_grad():
                sync()
                t = time.perf_counter()
                m(x)
                sync()
                forward = time.perf_counter() - t
            m.train()
            sync()
            t = time.perf_counter()
            m(x).sum().backward()
            sync()
            step = time.perf_counter() - t
            m.zero_grad(set_to_none=True)
            if r:
                best[name] = [min(best[name][0], forward), min(best[name][1], step)]
    ref = best["tiny-resnet (deep stem 8-8-16)"]
    print(f"batch 32 x 3x64x64 on {args.device}, best of {args.rounds} interleaved rounds")
    print(f"{'model':<34} {'params':>9} {'forward ms':>11} {'x':>6} {'fwd+bwd ms':>11} {'x':>6}")
    for name, m in models.items():
        f, s = best[name]
        params = sum(p.numel() for p in m.parameters())
        print(
            f"{name:<34} {params:>9,} {f * 1e3:>11.1f} {f / ref[0]:>6.2f} "
            f"{s * 1e3:>11.1f} {s / ref[1]:>6.2f}"
        )


if __name__ == "__main__":
    main()
