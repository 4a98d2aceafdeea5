"""`sar`: sharpness-aware and reliable entropy minimisation (Niu et al., "Towards Stable
Test-Time Adaptation in Dynamic Wild World", ICLR 2023).

Reliable samples (entropy below E0 = 0.4 ln K) drive a SAM update (Foret et al., ICLR 2021):
climb to w + rho * g / ||g||, take the gradient of the entropy of the samples still reliable
there, and apply it at w with the base optimiser. Model recovery: when the moving average of that
entropy (0.9 old + 0.1 new) falls below 0.2, the model has likely collapsed and is reset to the
source (counted in the record's resets).
The paper leaves the top blocks out of the update; here the target decides what moves.
State: the adapted parameters, the optimizer and the entropy moving average.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.methods.base import METHODS, Context
from clinadapt.methods.tta.adapter import (
    Adapter,
    StreamMethod,
    StreamOptions,
    check_model,
    collect_params,
    configure_model,
    make_optimizer,
    resolve_bn_prior,
    softmax_entropy,
)


class SAROptions(StreamOptions):
    # Published defaults (SAR repository): SGD lr 2.5e-4 momentum 0.9 for batch 64, rho 0.05,
    # margin E0 = 0.4 ln K, reset when the entropy moving average < 0.2.
    optimizer: Literal["adam", "sgd"] = Field("sgd", description="base optimiser (paper: SGD)")
    lr: float = Field(2.5e-4, gt=0, description="learning rate (paper: 2.5e-4 for batch 64)")
    rho: float = Field(0.05, ge=0, description="SAM neighbourhood radius")
    e_margin: float = Field(0.4, gt=0, description="reliable samples: entropy < e_margin * ln K")
    reset_constant: float = Field(
        0.2, ge=0, description="reset when the entropy moving average falls below this"
    )


class SARAdapter(Adapter):
    """SAR: a SAM step on the entropy of reliable samples, with model recovery."""

    def __init__(
        self,
        model: ImageClassifier,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        num_classes: int,
        options: SAROptions,
    ) -> None:
        super().__init__(model, optimizer)
        self.params = params
        self.rho = options.rho
        self.margin = options.e_margin * math.log(num_classes)
        self.reset_constant = options.reset_constant
        self.steps = options.steps
        self.ema: float | None = None

    def on_reset(self) -> None:
        self.ema = None

    def perturb(self) -> list[torch.Tensor]:
        """SAM's first step: move to w + rho * g / ||g|| and return the offsets."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2) if grads else 0.0
        offsets = []
        with torch.no_grad():
            for p in self.params:
                e = torch.zeros_like(p) if p.grad is None else p.grad * (self.rho / (norm + 1e-12))
                p.add_(e)
                offsets.append(e)
        return offsets

    def forward_and_adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = None
        for _ in range(self.steps):
            logits = self.model(x)
            ent = softmax_entropy(logits)
            reliable = ent.detach() < self.margin
            if not reliable.any():
                continue
            ent[reliable].mean().backward()
            offsets = self.perturb()
            self.optimizer.zero_grad(set_to_none=True)
            ent2 = softmax_entropy(self.model(x)[reliable])
            loss = ent2[ent2.detach() < self.margin].mean()
            if torch.isfinite(loss):
                value = float(loss.detach())
                self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
                loss.backward()
            with torch.no_grad():
                for p, e in zip(self.params, offsets, strict=True):
                    p.sub_(e)
            if torch.isfinite(loss):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None and self.ema < self.reset_constant:
                self.pending_reset = (
                    f"sar recovery: entropy moving average {self.ema:.3f} < {self.reset_constant}"
                )
        return logits, None if loss is None or not torch.isfinite(loss) else loss.detach()


@METHODS.register("sar")
class SAR(StreamMethod):
    """Adapt with SAM on reliable samples; reset when the entropy says the model collapsed."""

    name = "sar"
    default_target = "norm"
    Options = SAROptions

    def build(
        self, model: ImageClassifier, num_classes: int, options: SAROptions, ctx: Context
    ) -> SARAdapter:
        configure_model(model, resolve_bn_prior(options, ctx))
        params = collect_params(model)
        check_model(model, params, self.name)
        return SARAdapter(model, make_optimizer(params, options), params, num_classes, options)
