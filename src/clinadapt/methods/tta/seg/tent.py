"""`seg-tent`: Tent's entropy minimisation (Wang et al., ICLR 2021) on mask probabilities.

Configure: dropout off; BatchNorm layers (a U-Net's) normalise with test-batch statistics
blended with the source's as in classification Tent (SAM normalises with LayerNorm and has
none). Collect: the parameters the target opened (default ``norm``: the image encoder's
LayerNorm scale and shift for SAM; ``lora`` works too). Update: one step on the mean pixel
entropy of the batch's masks (binary entropy of each prompt's sigmoid map, or the softmax entropy
of a dense model); the prediction is the one from that same forward pass. Images whose prompts
ask for nothing add no loss.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from clinadapt.methods.base import METHODS, Context
from clinadapt.methods.tta.adapter import (
    StreamOptions,
    check_model,
    collect_params,
    configure_model,
    make_optimizer,
    resolve_bn_prior,
)
from clinadapt.methods.tta.seg.base import (
    SegAdapter,
    SegStreamResult,
    SegTTAMethod,
    entropy_loss,
    make_guard,
    run_seg_stream,
)
from clinadapt.segmentation.predict import MaskModel, ProbMap
from clinadapt.segmentation.prompts import Prompts


class SegTentOptions(StreamOptions):
    # Tent's published defaults (repository cfg.py): Adam, lr 1e-3, beta1 0.9, one step per batch.
    lr: float = Field(1e-3, gt=0, description="learning rate (Tent: Adam 1e-3)")


class SegTentAdapter(SegAdapter):
    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, steps: int) -> None:
        super().__init__(model, optimizer)
        self.steps = steps

    def forward_and_adapt(
        self, images: list[np.ndarray], prompts: list[Prompts]
    ) -> tuple[list[ProbMap], torch.Tensor | None]:
        loss = None
        for _ in range(self.steps):
            maps = self.model.mask_probs(images, prompts)
            loss = entropy_loss(maps)
            if loss is not None and torch.isfinite(loss):
                loss.backward()
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return [ProbMap(m.probs.detach(), m.exclusive, m.class_ids) for m in maps], (
            None if loss is None else loss.detach()
        )


@METHODS.register("seg-tent")
class SegTent(SegTTAMethod):
    """Adapt a segmentation model by minimising the entropy of its masks along the stream."""

    name = "seg-tent"
    default_target = "norm"
    Options = SegTentOptions

    def adapt_masks(
        self,
        model: MaskModel,
        stream: Any,
        prompts: Sequence[Prompts],
        options: SegTentOptions,
        ctx: Context,
    ) -> SegStreamResult:
        torch.manual_seed(ctx.seed)
        own = copy.deepcopy(model)
        configure_model(own, resolve_bn_prior(options, ctx))
        params = collect_params(own)
        check_model(own, params, self.name)
        adapter = SegTentAdapter(own, make_optimizer(params, options), options.steps)
        guard = make_guard(options)
        reset = options.guard == "reset"
        return run_seg_stream(adapter, stream, prompts, ctx, guard, self.name, reset)
