"""Max pooling on the CPU through the channels-last kernel.

torch's CPU ``max_pool2d`` is several times slower on a contiguous (N, C, H, W) batch than on the
same batch in channels-last layout (on this project's 2-core CPU, torch 2.14, one thread: the
tiny-resnet stem's 64x16x32x32 pool 8.1 ms against 2.2 ms with both layout conversions; a
ResNet-50 stem's 64x64x112x112 pool 97 ms against 24 ms; ``benchmarks/bench_tiny_resnet.py``).
A maximum does not depend on memory layout, so values and gradients are bitwise the same.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools 4-D CPU batches in channels-last layout and returns them in
    the layout they came in (contiguous (N, C, H, W), or channels-last when the network runs in
    it: :mod:`clinadapt.layout`); other devices and ``return_indices`` go unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.ndim != 4 or self.return_indices:
            return super().forward(x)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))
        return y if not x.is_contiguous() else y.contiguous()


def channels_last_pooling(model: nn.Module) -> int:
    """Swap every plain ``nn.MaxPool2d`` of ``model`` for :class:`ChannelsLastMaxPool2d` (same
    settings, no parameters); returns how many were swapped."""
    count = 0
    for name, child in list(model.named_children()):
        if type(child) is nn.MaxPool2d:
            fast = ChannelsLastMaxPool2d(
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                return_indices=child.return_indices,
                ceil_mode=child.ceil_mode,
            )
            setattr(model, name, fast)
            count += 1
        else:
            count += channels_last_pooling(child)
    return count
