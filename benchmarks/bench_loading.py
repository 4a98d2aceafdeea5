"""The input pipeline: images/s through ``ClinicalDataset.batches`` onto a device, the float
path (workers preprocess to float32, which is copied) against the uint8 path (workers stack
uint8 images, the device does the float work), with 0, 2 and 4 DataLoader workers.

A folder of grey PNGs (two classes) is written to a temporary directory, then read in batches
of 64 with the 224-pixel, three-channel preprocessing of an ImageNet backbone, as a GPU run would
read it. Both paths are timed side by side in one process (the settings interleaved, best of
``--repeats``), each checked against the float path without workers, and the bytes per image
each path moves from the workers to the device are printed. Then ``--epochs`` passes over the
folder, as a training loop makes them, with workers started for each pass against workers kept
from one pass to the next (``data.loading.keep_workers``).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_loading.py [--images 512] [--size 256]
[--device cuda]`` (with CUDA each batch is pinned and copied to the GPU ``non_blocking``).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clinadapt.data import load_dataset
from clinadapt.data.loading import available_cpus, keep_workers
from clinadapt.models.base import Preprocessing

IMAGENET = Preprocessing(
    image_size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), in_chans=3
)
BATCH = 64


def write_pngs(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        name = ("normal", "effusion")[i % 2]
        (root / name).mkdir(parents=True, exist_ok=True)
        img = 90 + 80 * np.sin(6 * xx + i) * yy + rng.normal(0, 12, (size, size))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i:05d}.png")


def read_all(ds, path: str, workers: int, device: str) -> tuple[float, torch.Tensor]:
    """Seconds to bring every batch onto ``device`` as the model's input, and the per-image
    sums (to check the paths agree)."""
    cuda = device.startswith("cuda")
    t = time.perf_counter()
    sums = []
    if path == "float":  # preprocessed to float32 on the host, then copied
        for x, _, _ in ds.batches(IMAGENET, BATCH, workers=workers, pin_memory=cuda):
            sums.append(x.to(device, non_blocking=cuda).double().sum((1, 2, 3)))
    else:  # uint8 on the host, the float work on the device
        for x, _, _ in ds.batches(IMAGENET, BATCH, workers=workers, pin_memory=cuda, device=device):
            sums.append(x.double().sum((1, 2, 3)))
    out = torch.cat(sums).cpu()  # waits for the last batch
    return time.perf_counter() - t, out


def epochs(ds, workers: int, device: str, n: int, kept: bool) -> float:
    """Seconds for ``n`` shuffled passes (uint8 path), workers kept between them or not."""
    cuda = device.startswith("cuda")
    t = time.perf_counter()
    with keep_workers() if kept else contextlib.nullcontext():
        for epoch in range(n):
            for x, _, _ in ds.batches(
                IMAGENET,
                BATCH,
                shuffle=True,
                seed=epoch,
                workers=workers,
                pin_memory=cuda,
                device=device,
            ):
                x.sum()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bytes_per_image(ds) -> tuple[float, float]:
    """Bytes of one image as the float path and as the uint8 path move it to the device."""
    imgs = [ds.image(i) for i in range(min(BATCH, len(ds)))]
    host = IMAGENET.host_stage(imgs)
    full = IMAGENET(imgs)
    return full.numel() * full.element_size() / len(imgs), host.nbytes / len(imgs)


def main() -> None:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 on 2 CPUs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=256, help="side of each PNG in pixels")
    ap.add_argument("--device", default="cpu", help="where the batches go (cuda: pinned memory)")
    ap.add_argument("--workers", default="0,2,4", help="DataLoader workers to compare")
    ap.add_argument("--repeats", type=int, default=2, help="passes per setting (best counts)")
    ap.add_argument("--epochs", type=int, default=4, help="passes for the kept-workers check")
    args = ap.parse_args()
    settings = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(Path(tmp), args.images, args.size)
        ds = load_dataset(tmp)
        float_bytes, uint8_bytes = bytes_per_image(ds)
        print(
            f"{len(ds)} grey PNGs of {args.size}x{args.size}, batches of {BATCH} -> 3x224x224 "
            f"({available_cpus()} CPUs, torch threads {torch.get_num_threads()}, to {args.device})"
        )
        print(
            f"  bytes per image from the workers to the device: float path {float_bytes:.0f}, "
            f"uint8 path {uint8_bytes:.0f} ({float_bytes / uint8_bytes:.1f}x fewer)"
        )
        read_all(ds, "float", 0, args.device)  # warm the page cache
        _, ref = read_all(ds, "float", 0, args.device)
        best: dict[tuple[str, int], float] = {}
        for _ in range(args.repeats):
            for workers in settings:
                for path in ("float", "uint8"):
                    t, sums = read_all(ds, path, workers, args.device)
                    tol = 0.0 if args.device == "cpu" else 1e-3  # other kernels on a GPU
                    torch.testing.assert_close(sums, ref, rtol=tol, atol=tol * 224 * 224)
                    key = (path, workers)
                    best[key] = min(best.get(key, float("inf")), t)
        base = best[("float", settings[0])]
        for workers in settings:
            f, u = best[("float", workers)], best[("uint8", workers)]
            print(
                f"  workers {workers}: float path {len(ds) / f:6.0f} images/s, uint8 path "
                f"{len(ds) / u:6.0f} images/s ({f / u:.2f}x the float path; "
                f"{base / u:.2f}x the float path with {settings[0]} workers)"
            )
        for workers in [w for w in settings if w > 0]:
            fresh = kept = float("inf")
            for _ in range(args.repeats):  # interleaved, best of repeats
                fresh = min(fresh, epochs(ds, workers, args.device, args.epochs, kept=False))
                kept = min(kept, epochs(ds, workers, args.device, args.epochs, kept=True))
            print(
                f"  {args.epochs} epochs, workers {workers}: started each epoch "
                f"{args.epochs * len(ds) / fresh:6.0f} images/s, kept "
                f"{args.epochs * len(ds) / kept:6.0f} images/s ({fresh / kept:.2f}x)"
            )


if __name__ == "__main__":
    main()
