"""Decoding image files: images/s through ``ClinicalDataset.batches`` with 0, 2 and 4 workers.

A folder of grey PNGs (two classes) is written to a temporary directory, then read in batches
of 64 with the 224-pixel, three-channel preprocessing of an ImageNet backbone, as a GPU run would
read it. Each setting is checked to yield exactly the batches of the main process.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_loading.py [--images 1024] [--size 256]
[--device cuda]`` (with CUDA each batch is pinned and copied to the GPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clinadapt.data import load_dataset
from clinadapt.data.loading import available_cpus
from clinadapt.models.base import Preprocessing

IMAGENET = Preprocessing(
    image_size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), in_chans=3
)


def write_pngs(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        name = ("normal", "effusion")[i % 2]
        (root / name).mkdir(parents=True, exist_ok=True)
        img = 90 + 80 * np.sin(6 * xx + i) * yy + rng.normal(0, 12, (size, size))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i:05d}.png")


def read_all(ds, workers: int, device: str) -> tuple[float, float]:
    """Seconds to read every batch onto ``device`` (pinned for CUDA), and a checksum."""
    cuda = device.startswith("cuda")
    t = time.perf_counter()
    checksum = torch.zeros((), dtype=torch.float64, device=device)
    for x, _, _ in ds.batches(IMAGENET, 64, workers=workers, pin_memory=cuda):
        checksum += x.to(device, non_blocking=cuda).double().sum()
    total = float(checksum)  # waits for the last copy
    return time.perf_counter() - t, total


def main() -> None:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 on 2 CPUs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=256, help="side of each PNG in pixels")
    ap.add_argument("--device", default="cpu", help="where the batches go (cuda: pinned memory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(Path(tmp), args.images, args.size)
        ds = load_dataset(tmp)
        print(
            f"{len(ds)} PNGs of {args.size}x{args.size}, batches of 64 -> 3x224x224 "
            f"({available_cpus()} CPUs, to {args.device})"
        )
        read_all(ds, 0, args.device)  # warm the page cache
        base, ref = read_all(ds, 0, args.device)
        print(f"  workers 0: {len(ds) / base:7.0f} images/s")
        for workers in (2, 4):
            t, check = read_all(ds, workers, args.device)
            assert check == ref, "workers changed the batches"
            print(f"  workers {workers}: {len(ds) / t:7.0f} images/s  ({base / t:.2f}x workers 0)")


if __name__ == "__main__":
    main()
