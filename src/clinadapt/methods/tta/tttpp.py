"""`tttpp`: test-time training with online feature alignment (Liu et al., "TTT++: When Does
Self-Supervised Test-Time Training Fail or Thrive?", NeurIPS 2021).

Source time (fit method ``tttpp-source``): the classifier is trained jointly with a
self-supervised branch, rotation prediction (0/90/180/270 degrees) on the encoder's features, and
the mean and covariance of the source features are stored as buffers of that branch. The branch
lives at ``model.tttpp``, so the cached source checkpoint carries it. A ``tttpp`` run trains its
source this way on its own: ``source.method=finetune`` (the default) is read as ``tttpp-source``.

Test time (``tttpp``): per batch, the rotation loss plus the alignment of the target feature mean
and covariance (estimated on the batch and a queue of recent features) to the source ones; then
predict with the updated model. The branch stays frozen; the target decides what moves.
State: the adapted parameters, the optimizer and the feature queue.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import IncompatibleError
from clinadapt.methods.base import METHODS, Context
from clinadapt.methods.finetune import Finetune, FinetuneOptions
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
)


class TTTBranch(nn.Module):
    """Rotation-prediction head and the source feature statistics."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.rotation = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))
        self.register_buffer("source_mean", torch.zeros(dim))
        self.register_buffer("source_cov", torch.zeros(dim, dim))


def attach_branch(model: ImageClassifier) -> TTTBranch:
    """Give ``model`` its TTT++ branch (once) and return it."""
    if not isinstance(getattr(model, "tttpp", None), TTTBranch):
        device = next(model.parameters()).device
        model.tttpp = TTTBranch(model.encoder.feature_dim).to(device)
    return model.tttpp


def rotate_batch(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate image i of ``x`` by k[i] * 90 degrees."""
    if x.shape[-1] != x.shape[-2]:
        raise IncompatibleError(
            f"tttpp's rotation task needs square inputs; the model takes {tuple(x.shape[-2:])}"
        )
    return torch.stack(
        [torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(x, k, strict=True)]
    )


def feature_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of the rows of ``f``."""
    mean = f.mean(0)
    c = f - mean
    return mean, c.T @ c / max(1, len(f) - 1)


def alignment_loss(
    f: torch.Tensor, source_mean: torch.Tensor, source_cov: torch.Tensor
) -> torch.Tensor:
    """Mean squared gap of the feature mean plus that of the covariance (per entry)."""
    mean, cov = feature_stats(f)
    loss = (mean - source_mean).pow(2).mean()
    if len(f) > 1:
        loss = loss + (cov - source_cov).pow(2).mean()
    return loss


class TTTPPSourceOptions(FinetuneOptions):
    aux_weight: float = Field(1.0, ge=0, description="weight of the rotation-prediction loss")


@METHODS.register("tttpp-source")
class TTTPPSource(Finetune):
    """Train classifier and rotation branch jointly; record the source feature statistics."""

    name = "tttpp-source"
    data_parallel = False  # the rotations are drawn per process: not one process's run
    default_target = "full"
    Options = TTTPPSourceOptions

    def load_adapted(self, model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
        attach_branch(model)
        model.load_state_dict(state, strict=False)

    def batch_loss(
        self,
        model: ImageClassifier,
        x: torch.Tensor,
        y: torch.Tensor,
        task: str,
        weight: torch.Tensor | None,
        options: TTTPPSourceOptions,
    ) -> torch.Tensor:
        """The supervised loss plus the weighted rotation-prediction loss of the branch."""
        k = torch.randint(4, (len(x),), generator=self._rotations).to(x.device)
        aux = F.cross_entropy(model.tttpp.rotation(model.features(rotate_batch(x, k))), k)
        return super().batch_loss(model, x, y, task, weight, options) + options.aux_weight * aux

    def fit(
        self,
        model: ImageClassifier,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: TTTPPSourceOptions,
        ctx: Context,
    ) -> dict[str, Any]:
        attach_branch(model)  # before finetune collects the trainable parameters
        self._rotations = torch.Generator().manual_seed(ctx.seed)
        summary = super().fit(model, train, val, options, ctx)
        record_source_stats(model, train, ctx)
        return summary


@torch.no_grad()
def record_source_stats(model: ImageClassifier, train: ClinicalDataset, ctx: Context) -> None:
    """Store the mean and covariance of the source features in ``model.tttpp``."""
    model.eval()
    feats = torch.cat(
        [model.features(x.to(ctx.device)) for x, _, _ in ctx.batches(train, model.preprocess)]
    )
    mean, cov = feature_stats(feats.float())
    model.tttpp.source_mean.copy_(mean)
    model.tttpp.source_cov.copy_(cov)


class TTTPPOptions(StreamOptions):
    aux_weight: float = Field(1.0, ge=0, description="weight of the rotation-prediction loss")
    align_weight: float = Field(1.0, ge=0, description="weight of the feature alignment loss")
    queue_size: int = Field(256, ge=0, description="recent target features kept for the statistics")


class TTTPPAdapter(Adapter):
    """TTT++: rotation loss plus feature alignment to the source, then predict."""

    def __init__(
        self,
        model: ImageClassifier,
        optimizer: torch.optim.Optimizer,
        options: TTTPPOptions,
        seed: int,
    ) -> None:
        super().__init__(model, optimizer)
        self.branch: TTTBranch = model.tttpp
        self.options = options
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: deque[torch.Tensor] = deque()

    def on_reset(self) -> None:
        self.queue.clear()

    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        o = self.options
        updates = 0
        for _ in range(o.steps):
            k = torch.randint(4, (len(x),), generator=self.generator).to(x.device)
            aux = F.cross_entropy(self.branch.rotation(self.model.features(rotate_batch(x, k))), k)
            f = self.model.features(x)
            feats = torch.cat([f, *self.queue]) if self.queue else f
            align = alignment_loss(feats, self.branch.source_mean, self.branch.source_cov)
            loss = o.aux_weight * aux + o.align_weight * align
            if torch.isfinite(loss):
                loss.backward()
                self.optimizer.step()
                updates += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.queue.append(f.detach())
        while self.queue and sum(len(q) for q in self.queue) > o.queue_size:
            self.queue.popleft()
        return Step(self.predict(x), loss.detach(), updates=updates, used=len(x))


@METHODS.register("tttpp")
class TTTPP(StreamMethod):
    """Adapt with the self-supervised branch and source feature statistics from source time."""

    name = "tttpp"
    default_target = "norm"
    source_method = "tttpp-source"
    Options = TTTPPOptions

    def build(
        self, model: ImageClassifier, num_classes: int, options: TTTPPOptions, ctx: Context
    ) -> TTTPPAdapter:
        if not isinstance(getattr(model, "tttpp", None), TTTBranch):
            raise IncompatibleError(
                "tttpp needs a source model trained by 'tttpp-source' (it carries the rotation "
                "branch and source feature statistics); set source.method=tttpp-source"
            )
        configure_model(model, resolve_bn_prior(options, ctx))
        for p in model.tttpp.parameters():
            p.requires_grad_(False)
        params = collect_params(model)
        check_model(model, params, self.name)
        return TTTPPAdapter(model, make_optimizer(params, options), options, ctx.seed)
