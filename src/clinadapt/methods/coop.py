"""`coop`: learn the text context of a CLIP-like model from few labelled images (CoOp).

Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022. Published recipe
(their configs ``rn50_ep50/ep100/rn50``): SGD, lr 0.002, momentum 0.9, weight decay 5e-4,
batch 32, cosine decay per epoch after one warm-up epoch at a constant lr of 1e-5; 50 epochs
for 1-2 shots, 100 for 4-8 shots, 200 for 16 shots. Both towers are frozen, so each image is
embedded once (through the feature cache) and every step only runs the text tower; CoOp's
random-crop and flip augmentation is left out for that reason.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.distributed import ShardSampler, backward_part, wrap
from clinadapt.errors import ClinadaptError, IncompatibleError
from clinadapt.features import FeatureCache, resolve_cache_dir
from clinadapt.methods.base import METHODS, Context, FitMethod
from clinadapt.methods.budget import FewShotOptions
from clinadapt.methods.finetune import supervised_loss
from clinadapt.progress import bar
from clinadapt.targets.text_prompt import PromptHead

WARMUP_LR = 1e-5  # CoOp's constant warm-up learning rate


class CoOpOptions(FewShotOptions):
    epochs: int | None = Field(
        None,
        ge=1,
        description="passes over the support set (default as CoOp: 50 for 1-2 shots, 100 for "
        "4-8, 200 for 16 or more; 50 for all training data)",
    )
    lr: float = Field(0.002, gt=0, description="SGD learning rate (CoOp: 0.002)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    warmup_epochs: int = Field(1, ge=0, description="epochs at the constant warm-up lr 1e-5")


def coop_epochs(shots: int | None) -> int:
    """CoOp's epoch budget for a shot count."""
    if shots is None or shots <= 2:
        return 50
    if shots <= 8:
        return 100
    return 200


def epoch_lr(epoch: int, epochs: int, lr: float, warmup: int) -> float:
    """Constant warm-up at 1e-5, then cosine decay from ``lr`` over all ``epochs`` (Dassl)."""
    if epoch < warmup:
        return WARMUP_LR
    return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))


def prompt_head(model: ImageClassifier, method: str) -> PromptHead:
    """The classifier's prompt head, or an error saying which target makes one."""
    if not isinstance(model.head, PromptHead):
        raise IncompatibleError(
            f"{method} trains a text prompt; apply the 'text-prompt' target first (model "
            f"{model.encoder.name!r} has a {type(model.head).__name__} head)"
        )
    return model.head


def frozen_features(
    model: ImageClassifier, ds: ClinicalDataset, ctx: Context, cache: FeatureCache | None = None
) -> torch.Tensor:
    """(N, D) image features of ``ds`` from the frozen image tower, embedded once."""
    cache = cache or FeatureCache(resolve_cache_dir(ctx.cache_dir))
    feats = cache.features(model, ds, ctx.batch_size, ctx.device)
    return torch.as_tensor(feats, dtype=torch.float32, device=ctx.device)


@METHODS.register("coop")
class CoOp(FitMethod):
    """Train the context vectors of the prompt head on (few-shot) labelled images."""

    name = "coop"
    data_parallel = True
    default_target = "text-prompt"
    Options = CoOpOptions

    def fit(
        self,
        model: ImageClassifier,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: CoOpOptions,
        ctx: Context,
    ) -> dict[str, Any]:
        head = prompt_head(model, "coop")
        support = self.labelled_budget(train, val, options, ctx.seed).train
        feats = frozen_features(model, support, ctx)
        labels = torch.as_tensor(support.labels, device=ctx.device)
        epochs = options.epochs or coop_epochs(options.shots)
        params = [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
        )
        history = train_prompt(
            head, feats, labels, train.task, opt, epochs, options, ctx, desc="coop"
        )
        return {"history": history, "support_images": len(support), "epochs": epochs}

    def load_adapted(self, model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
        prompt_head(model, "coop")
        super().load_adapted(model, state)


def train_prompt(
    head: PromptHead,
    feats: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    opt: torch.optim.Optimizer,
    epochs: int,
    options: CoOpOptions,
    ctx: Context,
    desc: str,
) -> list[dict[str, float]]:
    """Minimise cross-entropy of ``head`` on fixed features; one row of history per epoch.

    Under torchrun each process holds all the features and steps on its part of every global
    batch (:class:`ShardSampler`), through DistributedDataParallel."""
    net = wrap(head)  # under torchrun: every process starts from rank 0's context
    sampler = ShardSampler(len(feats), ctx.batch_size, shuffle=True, seed=ctx.seed * 1000)
    history = []
    pbar = bar(epochs * -(-len(feats) // ctx.batch_size), desc)
    try:
        for epoch in range(epochs):
            for group in opt.param_groups:
                group["lr"] = epoch_lr(epoch, epochs, options.lr, options.warmup_epochs)
            sampler.set_epoch(epoch)
            losses = []
            for part, batch in sampler.shards():
                opt.zero_grad(set_to_none=True)
                value = backward_part(
                    net,
                    feats,
                    part,
                    batch,
                    lambda logits, i: supervised_loss(logits, labels[i], task, None, 0.0),
                )
                if not math.isfinite(value):
                    raise ClinadaptError(
                        f"{desc}: non-finite loss at epoch {epoch}; lower the learning rate"
                    )
                opt.step()
                losses.append(value)
                pbar.update(1)
            history.append({"epoch": epoch, "loss": float(np.mean(losses))})
            pbar.set_postfix(epoch=epoch, loss=f"{history[-1]['loss']:.3f}")
    finally:
        pbar.close()
    return history
