"""Memory layout for inference of convolutional networks on the CPU.

On the CPU, torch's convolutions (oneDNN) and its train-mode BatchNorm kernel are much faster on
channels-last (N, H, W, C) tensors than on contiguous (N, C, H, W) ones. Measured on this
project's 2-core CPU (torch 2.14, one thread, forward passes of 224 px batches: 64 images for
tiny-resnet, 16 for ResNet-50): tiny-resnet's inference is 1.7x faster and ResNet-50's 1.3x; a
BatchNorm layer with test-batch statistics (the ``bn`` method) costs 1.8x its eval mode on a
(16, 256, 56, 56) batch in (N, C, H, W) and 1.2x in channels-last. ``benchmarks/bench_tta.py``
times ``bn`` against inference with both in this layout. The values are those of the (N, C, H, W) computation up to float32 rounding (the
sums run in another order: about 1e-7 on logits, 1e-5 with test-batch statistics).

Training keeps the contiguous layout, so a seeded training run gives the same weights as
before; only inference (prediction, ``bn``, embedding) switches, on the CPU, for networks with
convolutions and BatchNorm (ResNets, DenseNets, EfficientNets, CLIP's ResNets; not ViTs, whose
only convolution is the patch embedding). On CUDA the layout is left as it is (not measured
here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def prefers_channels_last(model: nn.Module, device: str | torch.device) -> bool:
    """Whether ``model`` infers faster in channels-last on ``device``: a CPU device and a 2-D
    convolutional network with BatchNorm (more than one ``Conv2d``, so not a ViT's patch
    embedding or a SAM neck; no 3-D convolution)."""
    if torch.device(device).type != "cpu":
        return False
    conv2d, norm2d = 0, False
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            return False
        conv2d += isinstance(m, nn.Conv2d)
        norm2d = norm2d or isinstance(m, nn.BatchNorm2d)
    return conv2d > 1 and norm2d


@contextlib.contextmanager
def channels_last_inference(model: nn.Module, device: str | torch.device) -> Iterator[None]:
    """Within: ``model``'s 4-D weights in channels-last when :func:`prefers_channels_last`;
    contiguous again on exit (the same values, so saving and training see what they saw)."""
    if not prefers_channels_last(model, device):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
