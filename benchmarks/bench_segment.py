"""Promptable segmentation costs, measured side by side in one run.

    python benchmarks/bench_segment.py [--model tiny-sam] [--random] [--input-size N]
        [--size 256] [--prompts 16] [--batch 2] [--repeats 3] [--threads 1] [--device cpu]

1. Prompts per second when the image embedding is computed once and reused for every prompt
   (``embed`` + ``predict``) against a full encoder pass per prompt (``segment``), and the ratio.
2. Fine-tuning step time (forward, Dice + BCE loss on box prompts, backward, AdamW step) and peak
   memory of ``decoder`` (encoder frozen; with the embeddings cached, as a decoder-only trainer
   can, and recomputed), ``lora`` on the image encoder (+ decoder, SAMed) and ``full``; ratios
   against ``full``. Peak memory: CUDA ``max_memory_allocated``; on CPU the process's peak
   resident memory above the loaded model (``/proc/self/status`` VmHWM after a reset), each
   target in its own process.

``--random`` builds a published architecture (e.g. ``--model sam-vit-b``) with random weights,
so the real sizes can be timed without downloading anything; ``--input-size 512`` runs that
architecture at a smaller input (same widths and depths, 4x fewer tokens) where 1024 is too
slow, e.g. on a CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from clinadapt.segmentation import load_segmenter, make_prompts
from clinadapt.segmentation.base import take
from clinadapt.targets import apply_target

TARGETS = {
    "full": ("full", None),
    "decoder (cached embeddings)": ("decoder", None),
    "decoder": ("decoder", None),
    "lora+decoder": ("lora+decoder", {"lora": {"rank": 4}}),
}


def build(args):
    """The segmenter of ``args`` (random weights for tiny models and ``--random``)."""
    pretrained = not args.random and not args.model.startswith("tiny")
    config = None
    if args.input_size:
        config = {
            "vision_config": {"image_size": args.input_size},
            "prompt_encoder_config": {"image_size": args.input_size},
        }
        pretrained = False
    return load_segmenter(args.model, pretrained=pretrained, config=config).to(args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = (rng.random((size, size)) * 80).astype(np.uint8)
        r0, c0 = rng.integers(0, size // 2, size=2)
        img[r0 : r0 + size // 3, c0 : c0 + size // 3] += 150
        out.append(img)
    return out


def _boxes(n: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, size // 2, size=(n, 2))
    wh = rng.integers(size // 8, size // 2, size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, size - 1)], axis=1).astype(np.float64)


def prompt_throughput(seg, image: np.ndarray, boxes: np.ndarray, repeats: int, device: str):
    """(prompts/s cached, prompts/s full pass per prompt), medians over interleaved rounds."""
    prompts = [make_prompts(image.shape, boxes=b) for b in boxes]
    cached_t, full_t = [], []
    for i in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        emb = seg.embed(image)
        for p in prompts:
            seg.predict(emb, p)
        _sync(device)
        if i:
            cached_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        for b in boxes:
            seg.segment(image, boxes=b)
        _sync(device)
        if i:
            full_t.append(time.perf_counter() - t)
    n = len(boxes)
    return n / statistics.median(cached_t), n / statistics.median(full_t)


def _loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MedSAM's loss: Dice (sigmoid, squared denominator) + binary cross-entropy."""
    inter = (probs * target).sum()
    dice = 1 - 2 * inter / (probs.pow(2).sum() + target.pow(2).sum() + 1e-5)
    return dice + torch.nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), target)


class Trainer:
    """One target's model, optimiser and batch; ``step`` runs one fine-tuning step."""

    def __init__(self, args, label: str, spec: str, options, images, boxes) -> None:
        self.seg = build(args)
        apply_target(self.seg, spec, options)
        self.seg.train()
        params = [p for p in self.seg.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)  # MedSAM's optimiser
        self.x, self.frames = self.seg.preprocess(images)
        self.prompts = [
            self.seg.model_prompts(make_prompts(im.shape, boxes=b), f)
            for im, b, f in zip(images, boxes, self.frames, strict=True)
        ]
        self.targets = []
        for im, b in zip(images, boxes, strict=True):
            t = torch.zeros(1, *im.shape, device=args.device)
            x1, y1, x2, y2 = (int(v) for v in b)
            t[:, y1 : y2 + 1, x1 : x2 + 1] = 1.0
            self.targets.append(t)
        self.cached = None
        if label.startswith("decoder (cached"):
            with torch.no_grad():
                self.cached = self.seg.encode(self.x)

    def step(self) -> None:
        if self.cached is not None:
            feats = self.cached
        elif any(p.requires_grad for m in self.seg.encoder_modules() for p in m.parameters()):
            feats = self.seg.encode(self.x)
        else:
            with torch.no_grad():
                feats = self.seg.encode(self.x)
        loss = 0.0
        for i, frame in enumerate(self.frames):
            low, _ = self.seg.decode_prompts(take(feats, i), self.prompts[i])
            loss = loss + _loss(self.seg.upsample(low[:, 0], frame), self.targets[i])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def step_times(trainers: dict[str, Trainer], repeats: int, device: str) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(repeats + 1):  # interleaved rounds; the first warms up
        for name, tr in trainers.items():
            _sync(device)
            t = time.perf_counter()
            tr.step()
            _sync(device)
            if i:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_memory(args, label: str, queue) -> None:
    torch.set_num_threads(args.threads)
    spec, options = TARGETS[label]
    images, boxes = _images(args.batch, args.size), _boxes(args.batch, args.size)
    tr = Trainer(args, label, spec, options, images, boxes)
    tr.step()  # optimiser state allocated
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tr.step()
        torch.cuda.synchronize()
        queue.put(torch.cuda.max_memory_allocated() - base)
        return
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    tr.step()
    queue.put(_status("VmHWM") - base)


def peak_memory(args, label: str) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory, args=(args, label, queue))
    proc.start()
    value = queue.get(timeout=3600)
    proc.join()
    return int(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny-sam")
    ap.add_argument("--random", action="store_true", help="published architecture, random weights")
    ap.add_argument("--input-size", type=int, default=0, help="model input side (with --random)")
    ap.add_argument("--size", type=int, default=256, help="square test image side in pixels")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seg = build(args)
    print(
        f"{args.model} ({seg.source}), input {seg.input_size}, {args.size}x{args.size} image, "
        f"device {args.device}, {args.threads} thread(s)"
    )

    cached, full = prompt_throughput(
        seg, _images(1, args.size)[0], _boxes(args.prompts, args.size), args.repeats, args.device
    )
    print(f"\n1. {args.prompts} box prompts on one image")
    print(f"   cached embedding       {cached:9.1f} prompts/s")
    print(f"   encoder pass / prompt  {full:9.1f} prompts/s")
    print(f"   ratio                  {cached / full:9.1f}x")

    images, boxes = _images(args.batch, args.size), _boxes(args.batch, args.size)
    trainers = {k: Trainer(args, k, *TARGETS[k], images, boxes) for k in TARGETS}
    times = step_times(trainers, args.repeats, args.device)
    counts = {
        k: sum(p.numel() for p in tr.seg.parameters() if p.requires_grad)
        for k, tr in trainers.items()
    }
    del trainers
    memory = {k: peak_memory(args, k) for k in TARGETS}
    print(f"\n2. fine-tuning step, batch {args.batch} (one box each), AdamW")
    print(
        f"   {'target':28s} {'trainable':>11s} {'step s':>8s} {'vs full':>8s} {'peak MiB':>9s} {'vs full':>8s}"
    )
    for k in TARGETS:
        print(
            f"   {k:28s} {counts[k]:11,d} {times[k]:8.3f} {times[k] / times['full']:8.2f} "
            f"{memory[k] / 2**20:9.1f} {memory[k] / max(memory['full'], 1):8.2f}"
        )


if __name__ == "__main__":
    main()
