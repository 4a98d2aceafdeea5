"""`memo`: marginal entropy minimisation with one test point (Zhang, Levine and Finn, "MEMO:
Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022).

For each image alone: draw B AugMix views, minimise the entropy of the *marginal* prediction
(the average of the views' softmax), take one step, predict the original image, then reset.
Every sample is its own episode, so nothing carries over between images. BatchNorm uses the
source statistics blended with the current batch (prior N = 16, as MEMO does for one point).
The paper updates all parameters; here the target decides (default ``full``).
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
)
from clinadapt.methods.tta.augment import augment_views
from clinadapt.methods.tta.bn import SINGLE_SAMPLE_PRIOR


class MEMOOptions(StreamOptions):
    optimizer: Literal["adam", "sgd"] = Field("sgd", description="optimiser (paper: SGD)")
    lr: float = Field(5e-3, gt=0, description="learning rate of the single step")
    augmentations: int = Field(16, ge=2, description="AugMix views per test image (B)")
    bn_prior: float | None = Field(
        SINGLE_SAMPLE_PRIOR, ge=0, le=1, description="weight of the source BN statistics"
    )


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax over the rows of ``logits`` (B views of one image)."""
    log_p = logits.log_softmax(1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    return -(log_mean.exp() * log_mean).sum()


class MEMOAdapter(Adapter):
    """MEMO: per image, one step on the marginal entropy of its views; reset afterwards."""

    def __init__(
        self,
        model: ImageClassifier,
        optimizer: torch.optim.Optimizer,
        options: MEMOOptions,
        seed: int,
    ) -> None:
        super().__init__(model, optimizer)
        self.views = options.augmentations
        self.steps = options.steps
        self.generator = torch.Generator().manual_seed(seed)

    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        out, losses, updates = [], [], 0
        for image in x:
            views = augment_views(image.cpu(), self.model.preprocess, self.views, self.generator)
            for _ in range(self.steps):
                loss = marginal_entropy(self.model(views.to(x.device)))
                if torch.isfinite(loss):
                    loss.backward()
                    self.optimizer.step()
                    updates += 1
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            with torch.no_grad():
                out.append(self.model(image.unsqueeze(0)))
            self.reset()
        return Step(torch.cat(out), torch.stack(losses).mean(), updates=updates, used=len(x))


@METHODS.register("memo")
class MEMO(StreamMethod):
    """Adapt on each test image alone through its augmentations; reset after each image."""

    name = "memo"
    default_target = "full"
    Options = MEMOOptions

    def build(
        self, model: ImageClassifier, num_classes: int, options: MEMOOptions, ctx: Context
    ) -> MEMOAdapter:
        configure_model(
            model, SINGLE_SAMPLE_PRIOR if options.bn_prior is None else options.bn_prior
        )
        params = collect_params(model)
        check_model(model, params, self.name)
        return MEMOAdapter(model, make_optimizer(params, options), options, ctx.seed)
