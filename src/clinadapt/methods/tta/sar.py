"""`sar`: sharpness-aware and reliable entropy minimisation (Niu et al., "Towards Stable
Test-Time Adaptation in Dynamic Wild World", ICLR 2023).

Reliable samples (entropy below E0 = 0.4 ln K) drive a SAM update (Foret et al., ICLR 2021):
climb to w + rho * g / ||g||, take the gradient of the entropy of the samples still reliable
there, and apply it at w with the base optimiser. Model recovery: when the moving average of that
entropy (0.9 old + 0.1 new) falls below 0.2, the model has likely collapsed and is reset to the
source (counted in the record's ``recoveries``, apart from the collapse guard's resets).
The paper leaves the top blocks out of the update; here the target decides what moves.
State: the adapted parameters, the optimizer and the entropy moving average.

As the authors' code (mr-eggplant/SAR, ``sar.py``), by default:
- the optimiser steps even when no sample is reliable (the gradient is then zero, but SGD's
  momentum still moves the weights); ``step_without_reliable=false`` skips that step;
- the moving average survives a recovery: ``SAR.reset()`` clears it, but ``SAR.forward`` then
  assigns the pre-reset value back (``self.ema = ema`` after ``self.reset()``), so a stream whose
  average fell below the threshold keeps resetting until fresh batches lift it above again;
  ``ema_after_reset=clear`` starts the average afresh instead.
The reset threshold 0.2 was set for ImageNet (K = 1000, margin 0.4 ln K = 2.76); with few classes
it can sit near the margin itself (0.277 for K = 2), and SAR then resets on most batches.
``reset_rule=log_k`` scales it with ln K (0.2 * ln K / ln 1000), keeping its published ratio to
the margin.
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
    Step,
    StreamMethod,
    StreamOptions,
    check_model,
    collect_params,
    configure_model,
    make_optimizer,
    resolve_bn_prior,
    softmax_entropy,
)

IMAGENET_CLASSES = 1000  # the K the published margin and reset threshold were set for


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
    reset_rule: Literal["fixed", "log_k"] = Field(
        "fixed",
        description="reset threshold: fixed (reset_constant, published) or log_k "
        "(reset_constant * ln K / ln 1000: the ImageNet ratio to the margin at any K)",
    )
    step_without_reliable: bool = Field(
        True,
        description="take the optimiser step when no sample is reliable (zero gradient, "
        "momentum moves the weights), as the authors' code does",
    )
    ema_after_reset: Literal["keep", "clear"] = Field(
        "keep",
        description="entropy moving average after a recovery: keep (as the authors' code) or clear",
    )


def reset_threshold(options: SAROptions, num_classes: int) -> float:
    """SAR's recovery threshold: the published constant, or that constant scaled with ln K."""
    if options.reset_rule == "log_k":
        return options.reset_constant * math.log(num_classes) / math.log(IMAGENET_CLASSES)
    return options.reset_constant


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
        self.threshold = reset_threshold(options, num_classes)
        self.options = options
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

    def sam_gradient(
        self, x: torch.Tensor, reliable: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]:
        """Leave in ``.grad`` the gradient at the SAM neighbour of the entropy of the samples
        reliable at both points; return that loss (None when no sample is left) and their
        number."""
        offsets = self.perturb()
        self.optimizer.zero_grad(set_to_none=True)
        ent2 = softmax_entropy(self.model(x)[reliable])
        keep = ent2.detach() < self.margin
        loss = ent2[keep].mean() if keep.any() else None
        if loss is not None and torch.isfinite(loss):
            value = float(loss.detach())
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
            loss.backward()
        with torch.no_grad():
            for p, e in zip(self.params, offsets, strict=True):
                p.sub_(e)
        return loss, int(keep.sum())

    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        loss, updates, used, n_reliable, recovery = None, 0, 0, 0, None
        for _ in range(self.options.steps):
            logits = self.model(x)
            ent = softmax_entropy(logits)
            reliable = ent.detach() < self.margin
            n_reliable = int(reliable.sum())
            loss, used = None, 0
            if n_reliable:
                ent[reliable].mean().backward()
                loss, used = self.sam_gradient(x, reliable)
            if loss is None:
                if not self.options.step_without_reliable:
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                for p in self.params:  # the authors' empty mean backpropagates zeros
                    p.grad = torch.zeros_like(p)
            if loss is None or torch.isfinite(loss):
                self.optimizer.step()
                updates += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None and self.ema < self.threshold:
                recovery = (
                    f"sar recovery: entropy moving average {self.ema:.3f} < {self.threshold:.3f} "
                    f"(reliability margin {self.margin:.3f})"
                )
                kept = self.ema
                self.reset()
                if self.options.ema_after_reset == "keep":
                    self.ema = kept
        finite = loss is not None and torch.isfinite(loss)
        return Step(
            logits,
            loss.detach() if finite else None,
            updates=updates,
            used=used,
            reliable=n_reliable,
            recovery=recovery,
        )


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
