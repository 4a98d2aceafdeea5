"""The global batch of a pre-training step when several processes each hold a part of it.

Under ``torchrun`` process r holds the places r, r+N, ... of every global batch. The objectives
that look across the batch see the whole of it through these functions: SimCLR's negatives
(:func:`gather_batch`, with gradient), DINO's centre and loss weights (:func:`global_sum`),
and batch normalisation (:class:`GlobalBatchNorm`, the "global BN" of SimCLR and the
SyncBatchNorm of DINO's ResNets). With one process every function returns its input.

Gradients: :func:`gather_batch` and the batch-norm sums are differentiable collectives, whose
backward pass sums each process's gradient into the processes that hold the rows. So when every
process weights its loss by its share (:func:`share`), the sum of the processes' losses is the
global batch's loss and the sum of their gradients is its gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clinadapt.distributed import world


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the processes, without gradient (``t`` itself for one process)."""
    if not world().active:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the processes; its gradient reaches every process's ``t``."""
    return fc.all_reduce(t, "sum", dist.group.WORLD) if world().active else t


def share(loss: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """A mean over this process's part of the batch (holding ``weight`` of it: images, masked
    patches) as its share of the mean over the global batch."""
    w = torch.as_tensor(weight, dtype=torch.float64, device=loss.device)
    return loss * (w / global_sum(w)).to(loss.dtype)


def batch_places(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """The places in the global batch of this process's ``n`` rows, and the global batch size."""
    w = world()
    total = int(global_sum(torch.tensor([n], dtype=torch.int64)).item())
    return torch.arange(w.rank, total, w.size, device=device), total


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """The global batch's rows (in their order) from each process's part ``x``, with gradient.

    Parts may differ in size by one (a batch that does not split evenly).
    """
    w = world()
    if not w.active:
        return x
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(w.size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64))
    sizes = [int(c.item()) for c in counts]
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    parts = fc.all_gather_single(padded, 0, dist.group.WORLD).chunk(w.size)  # differentiable
    rows = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
    places = torch.cat([torch.arange(r, sum(sizes), w.size) for r in range(w.size)])
    return rows[torch.argsort(places).to(rows.device)]


class GlobalBatchNorm(_BatchNorm):
    """Batch normalisation with the statistics of the global batch across processes.

    Training with several processes: the mean and (biased) variance of every channel are sums
    over all processes' parts, so each process normalises as one process would normalise the
    whole batch, and the running statistics stay the same everywhere. One process, or
    evaluation: exactly :class:`torch.nn.BatchNorm2d` and its kin. It works on CPU (gloo) and
    GPU (NCCL); ``torch.nn.SyncBatchNorm`` is GPU-only.
    """

    #: the batch-norm class this layer replaced (:func:`global_batchnorm`)
    replaced: type[_BatchNorm] | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or not self.track_running_stats
        if not (batch_stats and world().active):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        n = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        stats = sum_with_grad(torch.cat([x.sum(dims), n]))
        count = stats[-1].detach()
        mean = stats[:-1] / count
        centred = x - mean.view(shape)
        var = sum_with_grad((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(count))
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / max(count - 1.0, 1.0)
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def _moved(bn: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A ``cls`` layer holding ``bn``'s settings, parameters and buffers (the same tensors)."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    return new.train(bn.training)


def _swap(module: nn.Module, convert) -> nn.Module:
    new = convert(module)
    if new is not module:
        return new
    for name, child in module.named_children():
        swapped = _swap(child, convert)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every batch-norm layer a :class:`GlobalBatchNorm` holding the same
    parameters and buffers (the state dict keeps its keys; optimisers built later see the same
    parameters)."""

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm):
            bn = _moved(m, GlobalBatchNorm)
            bn.replaced = type(m)
            return bn
        return m

    return _swap(module, convert)


def local_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`global_batchnorm`: each layer back to the class it replaced (what the
    exported backbone holds, e.g. for code that looks for ``nn.BatchNorm2d``)."""

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, GlobalBatchNorm) and m.replaced is not None:
            return _moved(m, m.replaced)
        return m

    return _swap(module, convert)


__all__ = [
    "GlobalBatchNorm",
    "batch_places",
    "gather_batch",
    "global_batchnorm",
    "global_sum",
    "local_batchnorm",
    "share",
    "sum_with_grad",
]
