"""`bn`: normalise with test-batch statistics, optionally blended with the source statistics.

Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation", NeurIPS 2020: mean = w * source_mean + (1 - w) * batch_mean (likewise the variance),
where w = N / (N + n) for a prior strength N and batch size n. ``prior=0`` is pure test-batch
normalisation; ``prior=1`` is the source model.

The batch variance of the blend is the unbiased one, as in the authors' code
(bethgelab/robustness, ``robusta/batchnorm/bn.py``: ``BayesianBatchNorm`` reads the
``running_var`` of a momentum-1 BatchNorm, which PyTorch updates with the unbiased variance), and
the blended statistics are constants for the gradient (they are written into buffers there).
Train-mode BatchNorm, which Tent uses (DequanWang/tent, ``tent.configure_model``), normalises with
the biased variance and lets the gradient flow through the batch statistics: that is what a
pure-batch (prior 0) :class:`BatchStatsNorm` does for the gradient methods.

One image is no estimate of a domain's statistics, so a batch of a single image with ``prior=0``
falls back to :data:`SINGLE_SAMPLE_PRIOR` (the weight MEMO uses for single test points).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import IncompatibleError
from clinadapt.layout import prefers_channels_last
from clinadapt.methods.base import (
    METHODS,
    Context,
    Options,
    StreamResult,
    TTAMethod,
    logits_to_proba,
)
from clinadapt.progress import progress

#: Weight of the source statistics for a single test image: N / (N + 1) with the prior strength
#: N = 16 that MEMO (Zhang et al., NeurIPS 2022) uses for single-point BN adaptation.
SINGLE_SAMPLE_PRIOR = 16 / 17

Variance = Literal["unbiased", "biased"]


class BatchStatsNorm(nn.Module):
    """A BatchNorm that normalises with a blend of its source and the current batch statistics.

    ``variance`` None follows the published rule of each path: a blend (an effective prior above
    0) uses the unbiased batch variance as constants (Schneider et al., MEMO); pure batch
    statistics are train-mode BatchNorm (biased, differentiable; Tent). "unbiased" or "biased"
    forces that variance on both paths.
    """

    def __init__(
        self, bn: nn.modules.batchnorm._BatchNorm, prior: float, variance: Variance | None = None
    ) -> None:
        super().__init__()
        if bn.running_mean is None:
            raise IncompatibleError(
                "bn: a BatchNorm layer keeps no running statistics to blend with"
            )
        self.prior = float(prior)
        self.variance = variance
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("source_mean", bn.running_mean.detach().clone())
        self.register_buffer("source_var", bn.running_var.detach().clone())
        # timm's BatchNormAct2d fuses dropout and an activation after the normalisation
        self.drop = getattr(bn, "drop", None)
        self.act = getattr(bn, "act", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prior = self.prior if x.shape[0] > 1 or self.prior > 0 else SINGLE_SAMPLE_PRIOR
        if prior == 0:  # one fused kernel: train-mode batch norm without running statistics
            weight, eps = self.weight, self.eps
            count = x.numel() // x.shape[1]
            if self.variance == "unbiased" and count > 1:
                # w (x - m) / sqrt(c v + eps) = (w / sqrt c) (x - m) / sqrt(v + eps / c): the
                # unbiased variance c v, c = n / (n - 1), through the kernel's biased one
                c = count / (count - 1)
                ones = x.new_ones(x.shape[1]) if weight is None else weight
                weight, eps = ones / math.sqrt(c), eps / c
            y = F.batch_norm(x, None, None, weight, self.bias, True, 0.0, eps)
        else:
            y = F.batch_norm(x, *self.blend(x, prior), self.weight, self.bias, False, 0.0, self.eps)
        if self.drop is not None:
            y = self.drop(y)
        if self.act is not None:
            y = self.act(y)
        return y

    @torch.no_grad()
    def blend(self, x: torch.Tensor, prior: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var): ``prior`` * source + (1 - prior) * batch, as constants."""
        # statistics in the source statistics' dtype (fp32 under bf16/fp16 autocast): the
        # kernel takes float parameters with a half-precision input, not half statistics
        x = x.to(self.source_mean.dtype)
        dims = [0, *range(2, x.ndim)]
        count = x.numel() // x.shape[1]
        # one value per channel has no unbiased variance: use the biased one (0) then
        correction = 1 if self.variance != "biased" and count > 1 else 0
        # two passes (mean, then the centred sum of squares): exact as torch.var_mean, whose
        # reduction over (N, H, W) is several times slower on CPU
        mean = x.mean(dims)
        centred = x - mean.view(1, -1, *[1] * (x.ndim - 2))
        var = torch.linalg.vector_norm(centred, 2, dims).square() / (count - correction)
        if prior > 0:
            mean = torch.lerp(mean, self.source_mean, prior)
            var = torch.lerp(var, self.source_var, prior)
        return mean, var


def replace_batchnorm(model: nn.Module, prior: float, variance: Variance | None = None) -> int:
    """Swap every BatchNorm layer of ``model`` for a :class:`BatchStatsNorm`; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, BatchStatsNorm(child, prior, variance))
            count += 1
        else:
            count += replace_batchnorm(child, prior, variance)
    return count


class BNOptions(Options):
    prior: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="weight of the source statistics (0: test batch only; a single-image "
        "batch then uses 16/17)",
    )
    variance: Variance = Field(
        "unbiased",
        description="batch variance: unbiased as Schneider et al.'s code, or biased as "
        "train-mode BatchNorm (Tent's norm baseline)",
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
    ) -> StreamResult:
        adapted = copy.deepcopy(model).eval()
        if prefers_channels_last(adapted, ctx.device):  # as source inference (predict_proba)
            adapted.to(memory_format=torch.channels_last)
        if replace_batchnorm(adapted, options.prior, options.variance) == 0:
            raise IncompatibleError(
                f"bn needs BatchNorm layers; model {model.encoder.name!r} has none "
                "(for LayerNorm models use a gradient method such as tent on the 'norm' target)"
            )
        out = []
        total = -(-len(stream) // ctx.batch_size)
        with torch.no_grad():
            for x, _, _ in progress(
                ctx.batches(stream, model.preprocess), f"bn {stream.name}", total=total
            ):
                out.append(logits_to_proba(adapted(x.to(ctx.device)).float(), stream.task).cpu())
        return StreamResult.of(torch.cat(out))
