"""`bn`: normalise with test-batch statistics, optionally blended with the source statistics.

Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation", NeurIPS 2020: mean = w * source_mean + (1 - w) * batch_mean (likewise the variance),
where w = N / (N + n) for a prior strength N and batch size n. ``prior=0`` is pure test-batch
normalisation (as in Tent's BN step); ``prior=1`` is the source model.

One image is no estimate of a domain's statistics, so a batch of a single image with ``prior=0``
falls back to :data:`SINGLE_SAMPLE_PRIOR` (the weight MEMO uses for single test points).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from pydantic import Field
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import IncompatibleError
from clinadapt.methods.base import METHODS, Context, Options, TTAMethod, logits_to_proba
from clinadapt.progress import progress

#: Weight of the source statistics for a single test image: N / (N + 1) with the prior strength
#: N = 16 that MEMO (Zhang et al., NeurIPS 2022) uses for single-point BN adaptation.
SINGLE_SAMPLE_PRIOR = 16 / 17


class BatchStatsNorm(nn.Module):
    """A BatchNorm that normalises with a blend of its source and the current batch statistics."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, prior: float) -> None:
        super().__init__()
        if bn.running_mean is None:
            raise IncompatibleError(
                "bn: a BatchNorm layer keeps no running statistics to blend with"
            )
        self.prior = float(prior)
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("source_mean", bn.running_mean.detach().clone())
        self.register_buffer("source_var", bn.running_var.detach().clone())
        # timm's BatchNormAct2d fuses dropout and an activation after the normalisation
        self.drop = getattr(bn, "drop", None)
        self.act = getattr(bn, "act", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *list(range(2, x.ndim))]
        prior = self.prior if x.shape[0] > 1 or self.prior > 0 else SINGLE_SAMPLE_PRIOR
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        mean = prior * self.source_mean + (1 - prior) * mean
        var = prior * self.source_var + (1 - prior) * var
        shape = [1, -1] + [1] * (x.ndim - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.drop is not None:
            y = self.drop(y)
        if self.act is not None:
            y = self.act(y)
        return y


def replace_batchnorm(model: nn.Module, prior: float) -> int:
    """Swap every BatchNorm layer of ``model`` for a :class:`BatchStatsNorm`; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, BatchStatsNorm(child, prior))
            count += 1
        else:
            count += replace_batchnorm(child, prior)
    return count


class BNOptions(Options):
    prior: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="weight of the source statistics (0: test batch only; a single-image "
        "batch then uses 16/17)",
    )


@METHODS.register("bn")
class BatchNormAdapt(TTAMethod):
    """Re-estimate BatchNorm statistics on each test batch; no parameter is updated."""

    name = "bn"
    changes = "normalisation statistics (per test batch)"
    default_target = "none"
    Options = BNOptions

    def adapt(
        self, model: ImageClassifier, stream: ClinicalDataset, options: BNOptions, ctx: Context
    ) -> np.ndarray:
        adapted = copy.deepcopy(model).eval()
        if replace_batchnorm(adapted, options.prior) == 0:
            raise IncompatibleError(
                f"bn needs BatchNorm layers; model {model.encoder.name!r} has none "
                "(for LayerNorm models use a gradient method such as tent on the 'norm' target)"
            )
        out = []
        total = -(-len(stream) // ctx.batch_size)
        with torch.no_grad():
            for x, _, _ in progress(
                stream.batches(model.preprocess, ctx.batch_size), f"bn {stream.name}", total=total
            ):
                out.append(logits_to_proba(adapted(x.to(ctx.device)).float(), stream.task).cpu())
        return torch.cat(out).numpy().astype(np.float64)
