"""Pre-training throughput on CPU: ViT-Tiny (timm vit_tiny_patch16_224, random init).

For each input size (64x64, 224x224) and method (simclr, dino, mae) this times full training
steps (views, forward, backward, AdamW) with each method's default options, and the
augmentation alone, side by side in one run. Figures are unlabelled source images per second
(SimCLR makes 2 views of each, DINO 2 global + 6 local crops, MAE 1 masked view).

    python benchmarks/bench_pretrain.py [--steps 5] [--batch-size 32] [--sizes 64 224]
"""

from __future__ import annotations

import argparse
import time

import torch

from clinadapt.models import load_model
from clinadapt.ssl import SSL_METHODS
from clinadapt.ssl.augment import Augmenter, policy_for_modality
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.trainer import make_optimizer


def bench(method: str, size: int, batch_size: int, steps: int) -> tuple[float, float]:
    """(training images/s, augmentation-only images/s) for one method at one size."""
    fm = load_model("timm:vit_tiny_patch16_224", pretrained=False, img_size=size)
    cls = SSL_METHODS.get(method)
    aug = Augmenter(policy_for_modality("xray"), fm.preprocess.mean, fm.preprocess.std)
    m = cls(fm, cls.parse_options({}), aug).train()
    from clinadapt.ssl.config import PretrainConfig

    opt = make_optimizer(m, PretrainConfig(batch_size=batch_size))
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        loss = m.training_loss(images, ImageDraws.for_batch(0, i, range(batch_size)), i, 1000)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.after_step(i, 1000)

    step(0)  # warm-up: allocator, lazy initialisation
    t = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    train = steps * batch_size / (time.perf_counter() - t)

    # the views alone, as each method draws them
    t = time.perf_counter()
    for i in range(steps):
        g = ImageDraws.for_batch(0, i, range(batch_size))  # one generator per image
        if method == "simclr":
            m.views(images, g)
        elif method == "dino":
            for _ in range(2):
                aug.view(images, size, m.options.global_crops_scale, g)
            for _ in range(m.options.local_crops_number):
                aug.view(images, m.local_size, m.options.local_crops_scale, g)
        else:
            aug.view(images, size, m.options.crop_scale, g, policy=m.augment_policy)
    views = steps * batch_size / (time.perf_counter() - t)
    return train, views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--methods", nargs="+", default=["simclr", "dino", "mae"])
    args = ap.parse_args()
    print(
        f"ViT-Tiny/16 random init, CPU, torch threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, {args.steps} timed steps",
        flush=True,
    )
    print(f"{'size':>5} {'method':>7} {'train img/s':>12} {'views img/s':>12} {'vs simclr':>10}")
    for size in args.sizes:
        ref = None
        for method in args.methods:
            train, views = bench(method, size, args.batch_size, args.steps)
            ref = ref or (train if method == "simclr" else None)
            ratio = f"{train / ref:.2f}x" if ref else "-"
            print(f"{size:>5} {method:>7} {train:>12.1f} {views:>12.1f} {ratio:>10}", flush=True)


if __name__ == "__main__":
    main()
