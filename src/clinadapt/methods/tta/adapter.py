"""What every gradient test-time method shares: configure, collect, check, then walk the stream.

A method builds an :class:`Adapter` on a private copy of the source model. The adapter keeps the
source state (model and optimizer) so that :meth:`Adapter.reset` can return to it; its
``forward_and_adapt`` predicts one batch while updating the parameters the target opened.
"""

from __future__ import annotations

import abc
import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import IncompatibleError
from clinadapt.methods.base import Context, Options, TTAMethod, check_single_label
from clinadapt.methods.trace import StreamResult
from clinadapt.methods.tta.bn import SINGLE_SAMPLE_PRIOR, replace_batchnorm
from clinadapt.methods.tta.guard import CollapseGuard, non_finite
from clinadapt.progress import progress

log = logging.getLogger("clinadapt.tta")


class GuardOptions(Options):
    """Options of the collapse monitor, which every streaming test-time method has."""

    guard: Literal["watch", "reset"] = Field(
        "watch",
        description="collapse monitor: watch (record entropy, diversity and would-be resets; "
        "the method runs as published) or reset (back to the source model on a collapse)",
    )
    guard_window: int = Field(128, ge=1, description="predictions the collapse monitor watches")
    guard_entropy: float = Field(
        0.05, ge=0, description="collapse: mean entropy below this fraction of ln K"
    )
    guard_share: float = Field(
        0.95, gt=0, le=1, description="collapse: share of the window predicted as one class"
    )


class StreamOptions(GuardOptions):
    """Options every gradient test-time method has (optimiser, BN statistics, monitor)."""

    optimizer: Literal["adam", "sgd"] = Field("adam", description="optimiser of the update")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Adam: beta1)")
    nesterov: bool = Field(False, description="SGD: Nesterov momentum (when momentum > 0)")
    steps: int = Field(1, ge=1, description="update steps per test batch")
    bn_prior: float | None = Field(
        None,
        ge=0,
        le=1,
        description="weight of the source BatchNorm statistics (None: 0 for batches, "
        "16/17 for single-sample streams)",
    )


@dataclass
class Step:
    """What one ``forward_and_adapt`` did: the batch's logits and an account of the update.

    ``used``: samples in the loss of the last update (after the method's filters; None: every
    sample); ``reliable``: samples past its entropy filter (None: it has none); ``updates``:
    optimiser steps taken; ``recovery``: why the method's own reset rule fired (SAR), if it did.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    updates: int = 0
    used: int | None = None
    reliable: int | None = None
    recovery: str | None = None


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax of ``logits``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def configure_model(model: nn.Module, bn_prior: float) -> int:
    """Switch dropout off and make BatchNorm normalise with test-batch statistics (Tent).

    With ``bn_prior`` 0 that is train-mode BatchNorm, as Tent, EATA and SAR configure it; a prior
    above 0 (or a single-image batch) blends in the source statistics with the unbiased batch
    variance, as Schneider et al. and MEMO do (see ``bn.py``). Returns the number of BatchNorm
    layers replaced. The affine parameters stay the same tensors, so whatever the target opened
    stays trainable.
    """
    model.eval()
    return replace_batchnorm(model, bn_prior)


def collect_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to adapt: those the target left with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def check_model(model: nn.Module, params: list[nn.Parameter], method: str) -> None:
    """Fail with a clear message when there is nothing to adapt."""
    if not params:
        name = getattr(getattr(model, "encoder", model), "name", type(model).__name__)
        raise IncompatibleError(
            f"{method}: the target opened no parameter of model {name!r}; choose one such as "
            "--target norm (or lora, bias, full)"
        )


def make_optimizer(params: list[nn.Parameter], options: StreamOptions) -> torch.optim.Optimizer:
    """The optimiser the options name, over ``params``."""
    if options.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=options.lr,
            momentum=options.momentum,
            nesterov=options.nesterov
            and options.momentum > 0,  # no momentum, nothing to look ahead
        )
    return torch.optim.Adam(params, lr=options.lr, betas=(options.momentum, 0.999))


def resolve_bn_prior(options: StreamOptions, ctx: Context) -> float:
    """The BatchNorm prior to use: the option, or a fallback for single-sample streams."""
    if options.bn_prior is not None:
        return options.bn_prior
    return SINGLE_SAMPLE_PRIOR if ctx.batch_size == 1 else 0.0


class Adapter(abc.ABC):
    """One model copy adapting along a stream; ``reset`` returns it to the source state."""

    def __init__(self, model: ImageClassifier, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self._model_state = copy.deepcopy(model.state_dict())
        self._optim_state = copy.deepcopy(optimizer.state_dict()) if optimizer else None

    def reset(self) -> None:
        """Restore the source model and a fresh optimizer state."""
        self.model.load_state_dict(self._model_state)
        if self.optimizer is not None and self._optim_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._optim_state))
        self.on_reset()

    def on_reset(self) -> None:  # noqa: B027  (an optional hook, not abstract)
        """Clear method state kept outside the model (moving averages, queues, ...)."""

    @abc.abstractmethod
    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        """Predict ``x`` while adapting; return its logits and what the update did."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the current model, without adapting."""
        return self.model(x)


class StreamMethod(TTAMethod):
    """A test-time method that adapts a private copy of the model along the stream."""

    Options: ClassVar[type[Options]] = StreamOptions
    single_label = True  # entropy, filters and pseudo-labels over a softmax

    @abc.abstractmethod
    def build(
        self, model: ImageClassifier, num_classes: int, options: Any, ctx: Context
    ) -> Adapter:
        """Configure ``model`` (a private copy), collect and check its parameters, wrap it."""

    def adapt(
        self, model: ImageClassifier, stream: ClinicalDataset, options: Any, ctx: Context
    ) -> StreamResult:
        check_single_label(self, stream)
        torch.manual_seed(ctx.seed)
        adapter = self.build(copy.deepcopy(model), stream.num_classes, options, ctx)
        guard = CollapseGuard(
            stream.num_classes,
            window=options.guard_window,
            entropy_frac=options.guard_entropy,
            share=options.guard_share,
        )
        return run_stream(adapter, stream, ctx, guard, options.guard == "reset", self.name)


def run_stream(
    adapter: Adapter,
    stream: ClinicalDataset,
    ctx: Context,
    guard: CollapseGuard,
    reset_on_collapse: bool,
    method: str,
) -> StreamResult:
    """Adapt along ``stream`` in order, keeping a trace of each batch.

    A non-finite output always resets to the source model; a collapse the monitor sees resets
    only when ``reset_on_collapse`` (``guard=reset``). Resets are logged and counted.
    """
    out, trace, events = [], [], []
    start = 0
    total = -(-len(stream) // ctx.batch_size)
    batches = ctx.batches(stream, adapter.model.preprocess)
    for x, _, pos in progress(batches, f"{method} {stream.name}", total=total):
        x = x.to(ctx.device)
        step = adapter.forward_and_adapt(x)
        # one copy to the host per batch; the monitor and the checks read it there (on a GPU,
        # each value read from the device separately would wait for the device again)
        probs = step.logits.detach().float().softmax(1).cpu()
        loss = None if step.loss is None else float(step.loss)
        why = non_finite(probs, loss)
        if why:
            adapter.reset()
            guard.clear()
            if not torch.isfinite(probs).all():
                probs = adapter.predict(x).float().softmax(1).cpu()
        reading = guard.observe(probs)
        if reading.collapse and reset_on_collapse and not why:
            why = reading.collapse
            adapter.reset()
            guard.clear()
        if step.recovery:
            events.append(event(method, stream.name, start, "recovery", step.recovery))
            log.info(
                "%s: recovery at image %d of %s: %s", method, start, stream.name, step.recovery
            )
        if why:
            events.append(event(method, stream.name, start, "reset", why))
            log.warning(
                "%s: reset to the source model at image %d of %s: %s",
                method,
                start,
                stream.name,
                why,
            )
        elif reading.collapse:
            events.append(event(method, stream.name, start, "would-reset", reading.collapse))
        trace.append(
            {
                "position": start,
                "size": len(pos),
                "entropy": reading.entropy,
                "diversity": reading.diversity,
                "top_share": reading.top_share,
                "collapse": int(reading.collapse is not None),
                "used": step.used,
                "reliable": step.reliable,
                "updates": step.updates,
                "loss": loss,
                "recovery": int(step.recovery is not None),
                "reset": int(why is not None),
            }
        )
        out.append(probs)
        start += len(pos)
    return StreamResult(torch.cat(out).numpy().astype(np.float64), trace, events)


def event(method: str, stream: str, position: int, kind: str, reason: str) -> dict[str, Any]:
    """One entry of a stream's events: a reset, a method's recovery or a would-be reset."""
    return {
        "method": method,
        "stream": stream,
        "position": int(position),
        "kind": kind,
        "reason": reason,
    }
