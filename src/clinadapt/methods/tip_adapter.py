"""`tip-adapter` and `tip-adapter-f`: a few-shot cache model blended with CLIP zero-shot logits.

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification",
ECCV 2022. Keys are the L2-normalised support features, values their one-hot labels; a query f
scores ``exp(-beta (1 - f keys^T)) values`` and the logits are ``logit_scale f W^T + alpha *
that``, with W the class text embeddings. alpha and beta are grid-searched as in the paper, on
the labelled data the run may see (``selection``, :mod:`clinadapt.methods.budget`): the validation
split with all training data; in K-shot runs, by cross-validation within the support set, or on
a K-shot validation set, or not at all (the paper's alpha 1, beta 5.5). Tip-Adapter-F also
fine-tunes the keys. A model without a text tower runs the cache alone.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.distributed import ShardSampler, backward_part, wrap
from clinadapt.methods.base import METHODS, Context
from clinadapt.methods.budget import CrossValidatedOptions, n_cv_folds, stratified_folds
from clinadapt.methods.frozen import (
    FeatureHead,
    FrozenFeatureMethod,
    FrozenOptions,
    LabelledFeatures,
)
from clinadapt.progress import bar

GridEnd = Annotated[float, Field(gt=0.1)]
GridSize = Annotated[int, Field(ge=1)]


class TipAdapterOptions(FrozenOptions, CrossValidatedOptions):
    # Defaults of the paper's ImageNet configuration: alpha=1, beta=5.5, search over
    # beta in [0.1, 7) (200 steps) and alpha in [0.1, 3) (20 steps).
    alpha: float = Field(1.0, ge=0, description="weight of the cache logits (before the search)")
    beta: float = Field(5.5, gt=0, description="sharpness of the cache affinities (before search)")
    search: bool = Field(
        True,
        description="search alpha and beta (balanced accuracy), on the data selection allows",
    )
    search_scale: tuple[GridEnd, GridEnd] = Field(
        (7.0, 3.0), description="upper ends of the beta and alpha grids (each starts at 0.1)"
    )
    search_steps: tuple[GridSize, GridSize] = Field(
        (200, 20), description="grid sizes for beta and alpha"
    )
    templates: list[str] | None = Field(
        None, description="prompt templates for the zero-shot logits (default: by modality)"
    )
    zero_shot: bool = Field(
        True, description="blend with CLIP zero-shot logits when the model has a text tower"
    )


class TipAdapterFOptions(TipAdapterOptions):
    # The paper's recipe: AdamW (eps 1e-4), lr 1e-3, cosine schedule, 20 epochs, batch 256.
    epochs: int = Field(20, ge=1, description="epochs of cache-key fine-tuning")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the cache keys")
    batch_size: int = Field(256, ge=1, description="support features per step")


class TipAdapterHead(FeatureHead):
    """``logit_scale f W^T + alpha exp(-beta (1 - f keys^T)) values`` on normalised features."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor | float,
        alpha: torch.Tensor | float,
        beta: torch.Tensor | float,
    ) -> None:
        super().__init__(
            keys=torch.as_tensor(keys, dtype=torch.float32),
            values=torch.as_tensor(values, dtype=torch.float32),
            text=torch.as_tensor(text, dtype=torch.float32),  # (0, D) without a text tower
            logit_scale=torch.as_tensor(logit_scale, dtype=torch.float32),
            alpha=torch.as_tensor(alpha, dtype=torch.float32),
            beta=torch.as_tensor(beta, dtype=torch.float32),
        )

    @property
    def has_text(self) -> bool:
        return self.text.shape[0] > 0

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return tip_logits(
            F.normalize(f.float(), dim=-1),
            self.keys,
            self.values,
            self.text if self.has_text else None,
            self.logit_scale,
            self.alpha,
            self.beta,
        )


def tip_logits(
    f: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    text: torch.Tensor | None,
    logit_scale: torch.Tensor | float,
    alpha: torch.Tensor | float,
    beta: torch.Tensor | float,
) -> torch.Tensor:
    """Tip-Adapter logits of unit-norm features ``f`` (differentiable in ``keys``)."""
    cache = torch.exp(-beta * (1.0 - f @ keys.T)) @ values
    if text is None:
        return alpha * cache
    return logit_scale * f @ text.T + alpha * cache


def alpha_beta_grid(
    scale: tuple[float, float], steps: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's grids: ``0.1 + i (scale - 0.1) / steps`` for i < steps (betas, alphas)."""
    betas = torch.tensor([0.1 + i * (scale[0] - 0.1) / steps[0] for i in range(steps[0])])
    alphas = torch.tensor([0.1 + i * (scale[1] - 0.1) / steps[1] for i in range(steps[1])])
    return betas, alphas


def class_hits(
    f: torch.Tensor,
    y: np.ndarray,
    keys: torch.Tensor,
    values: torch.Tensor,
    text: torch.Tensor | None,
    logit_scale: float,
    betas: torch.Tensor,
    alphas: torch.Tensor,
) -> torch.Tensor:
    """(B, A, K): for each (beta, alpha), the correct predictions among each true class."""
    n, k = len(f), values.shape[1]
    distance = 1.0 - f @ keys.T  # (N, M)
    zero_shot = logit_scale * f @ text.T if text is not None else torch.zeros(n, k)
    y_t = torch.as_tensor(y).long()
    onehot = F.one_hot(y_t, k).float()  # (N, K)
    # all betas and alphas in a few large operations (not hundreds of tiny ones), in chunks
    # of betas that bound the memory
    chunk = max(1, int(2e7 // max(distance.numel(), len(alphas) * n * k)))
    out = []
    for start in range(0, len(betas), chunk):
        b = betas[start : start + chunk, None, None]
        cache = torch.exp(-b * distance[None]) @ values  # (B, N, K)
        logits = zero_shot + alphas[None, :, None, None] * cache[:, None]  # (B, A, N, K)
        hit = (logits.argmax(-1) == y_t).float()  # (B, A, N)
        out.append(hit @ onehot)
    return torch.cat(out)


def best_alpha_beta(
    hits: torch.Tensor, y: np.ndarray, betas: torch.Tensor, alphas: torch.Tensor
) -> tuple[float, float, float]:
    """The first best (alpha, beta) in (beta, alpha) order by balanced accuracy, and its score."""
    counts = torch.as_tensor(np.bincount(y, minlength=hits.shape[-1])).float()
    present = counts > 0
    score = (hits[..., present] / counts[present]).mean(-1)  # mean recall of present classes
    i = int(score.argmax())
    bi, ai = divmod(i, len(alphas))
    return float(alphas[ai]), float(betas[bi]), float(score[bi, ai])


def search_alpha_beta(
    f: torch.Tensor,
    y: np.ndarray,
    keys: torch.Tensor,
    values: torch.Tensor,
    text: torch.Tensor | None,
    logit_scale: float,
    scale: tuple[float, float],
    steps: tuple[int, int],
) -> tuple[float, float, float]:
    """Grid-search (alpha, beta) on labelled unit-norm features; return them and the best score.

    The grids are the paper's (:func:`alpha_beta_grid`); the score is balanced accuracy, the
    first best pair in (beta, alpha) order wins.
    """
    betas, alphas = alpha_beta_grid(scale, steps)
    hits = class_hits(f, y, keys, values, text, logit_scale, betas, alphas)
    return best_alpha_beta(hits, y, betas, alphas)


def _text_weights(
    model: ImageClassifier, data: ClinicalDataset, options: TipAdapterOptions
) -> torch.Tensor | None:
    if not (options.zero_shot and model.encoder.has_text):
        return None
    from clinadapt.methods.templates import check_templates, templates_for
    from clinadapt.methods.zeroshot import zeroshot_weights

    templates = (
        check_templates(options.templates)
        if options.templates is not None
        else list(templates_for(data.modality))
    )
    return zeroshot_weights(model.encoder, data.class_names, templates).float().cpu()


class CacheLogits(torch.nn.Module):
    """Tip-Adapter-F's trained part: :func:`tip_logits` of unit-norm features with the cache
    keys as the one parameter (the values, text weights, alpha and beta stay fixed)."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor | None,
        logit_scale: float,
        alpha: float,
        beta: float,
    ) -> None:
        super().__init__()
        self.keys = torch.nn.Parameter(keys.clone())
        self.values, self.text = values, text
        self.logit_scale, self.alpha, self.beta = logit_scale, alpha, beta

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return tip_logits(
            f, self.keys, self.values, self.text, self.logit_scale, self.alpha, self.beta
        )


@METHODS.register("tip-adapter")
class TipAdapter(FrozenFeatureMethod):
    """Build the cache from the support features; search alpha and beta within the budget."""

    name = "tip-adapter"
    changes = "support-feature cache (no training)"
    Options = TipAdapterOptions
    head_type = TipAdapterHead
    cross_validates = True

    def fit_head(
        self,
        model: ImageClassifier,
        support: LabelledFeatures,
        val: LabelledFeatures | None,
        data: ClinicalDataset,
        options: TipAdapterOptions,
        ctx: Context,
    ) -> tuple[TipAdapterHead, dict[str, Any]]:
        keys = F.normalize(torch.from_numpy(support.x).float(), dim=-1)
        values = F.one_hot(torch.from_numpy(support.y).long(), data.num_classes).float()
        text = _text_weights(model, data, options)
        scale = model.encoder.logit_scale if text is not None else 1.0
        summary: dict[str, Any] = {"zero_shot": text is not None, "cache_size": len(keys)}
        if text is None:
            summary["note"] = (
                f"model {model.encoder.name!r} has no text tower (or zero_shot is off): "
                "Tip-Adapter ran with the cache model only"
            )
        selection = options.selection if options.search else "fixed"
        if selection == "auto":  # called directly: choose as the budget would
            smallest = np.bincount(support.y)[np.unique(support.y)].min()
            selection = "validation" if val is not None else "support-cv"
            if selection == "support-cv" and smallest < 2:
                selection = "fixed"
        if selection in ("validation", "kshot-val") and val is None:
            selection = "fixed"
        summary["selection"] = selection
        tuning_val = val if selection in ("validation", "kshot-val") else None
        keys = self.tune_keys(keys, values, text, scale, support, tuning_val, options, ctx, summary)
        alpha, beta = options.alpha, options.beta
        if tuning_val is not None:
            fv = F.normalize(torch.from_numpy(val.x).float(), dim=-1)
            alpha, beta, score = search_alpha_beta(
                fv, val.y, keys, values, text, scale, options.search_scale, options.search_steps
            )
            summary["val_balanced_accuracy"] = score
        elif selection == "support-cv":
            alpha, beta, score, n_folds = self.cross_validate(
                support, values, text, scale, options, ctx
            )
            summary.update(cv_balanced_accuracy=score, cv_folds=n_folds)
        empty = torch.zeros(0, keys.shape[1])
        head = TipAdapterHead(keys, values, text if text is not None else empty, scale, alpha, beta)
        return head, {**summary, "alpha": alpha, "beta": beta, "logit_scale": scale}

    def cross_validate(
        self,
        support: LabelledFeatures,
        values: torch.Tensor,
        text: torch.Tensor | None,
        scale: float,
        options: TipAdapterOptions,
        ctx: Context,
    ) -> tuple[float, float, float, int]:
        """(alpha, beta) by stratified cross-validation within the support set.

        Each fold's cache holds the other folds' images (keys tuned on them alone for
        Tip-Adapter-F); the held-out images are queries, and their hits are pooled over folds.
        """
        n_folds = n_cv_folds(support.y, options.cv_folds)
        folds = stratified_folds(support.y, n_folds, ctx.seed)
        f = F.normalize(torch.from_numpy(support.x).float(), dim=-1)
        betas, alphas = alpha_beta_grid(options.search_scale, options.search_steps)
        hits = torch.zeros(len(betas), len(alphas), values.shape[1])
        for fold in range(n_folds):
            fit = torch.as_tensor(folds != fold)
            part = LabelledFeatures(support.x[fit.numpy()], support.y[fit.numpy()])
            keys = self.tune_keys(f[fit], values[fit], text, scale, part, None, options, ctx, {})
            held = ~fit
            y_held = support.y[held.numpy()]
            hits += class_hits(f[held], y_held, keys, values[fit], text, scale, betas, alphas)
        alpha, beta, score = best_alpha_beta(hits, support.y, betas, alphas)
        return alpha, beta, score, n_folds

    def tune_keys(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor | None,
        scale: float,
        support: LabelledFeatures,
        val: LabelledFeatures | None,
        options: TipAdapterOptions,
        ctx: Context,
        summary: dict[str, Any],
    ) -> torch.Tensor:
        """The training-free method keeps the keys as they are."""
        return keys


@METHODS.register("tip-adapter-f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter with the cache keys trained by cross-entropy on the support set."""

    name = "tip-adapter-f"
    data_parallel = True
    changes = None  # the cache keys are fine-tuned: the head's parameters
    Options = TipAdapterFOptions

    def tune_keys(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor | None,
        scale: float,
        support: LabelledFeatures,
        val: LabelledFeatures | None,
        options: TipAdapterFOptions,
        ctx: Context,
        summary: dict[str, Any],
    ) -> torch.Tensor:
        """Train the keys with the initial alpha and beta; keep the epoch best on ``val``.

        Without ``val`` (support-cv and fixed selection) the last epoch's keys are kept. The
        paper trains on augmented views of the support images; the keys here train on the
        cached (unaugmented) features, so the backbone still runs once per image.
        """
        f = F.normalize(torch.from_numpy(support.x).float(), dim=-1)
        y = torch.from_numpy(support.y).long()
        fv = F.normalize(torch.from_numpy(val.x).float(), dim=-1) if val is not None else None
        cache = CacheLogits(keys, values, text, scale, options.alpha, options.beta)
        trained = cache.keys
        net = wrap(cache)  # under torchrun: DistributedDataParallel, rank 0's keys everywhere
        opt = torch.optim.AdamW([trained], lr=options.lr, eps=1e-4)
        sampler = ShardSampler(len(f), options.batch_size, shuffle=True, seed=ctx.seed * 1000)
        steps = options.epochs * -(-len(f) // options.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        best, best_keys, history = -math.inf, keys, []
        pbar = bar(steps, self.name)
        try:
            for epoch in range(options.epochs):
                sampler.set_epoch(epoch)
                for part, batch in sampler.shards():  # this process's part of each batch
                    opt.zero_grad(set_to_none=True)
                    loss = backward_part(
                        net, f, part, batch, lambda logits, i: F.cross_entropy(logits, y[i])
                    )
                    opt.step()
                    sched.step()
                    pbar.update(1)
                row = {"epoch": epoch, "loss": loss}
                with torch.no_grad():
                    if fv is not None:
                        pred = cache(fv).argmax(1)
                        score = _balanced_accuracy(val.y, pred.numpy())
                        row["val_balanced_accuracy"] = score
                        if score > best:
                            best, best_keys = score, trained.detach().clone()
                    else:
                        best_keys = trained.detach().clone()
                history.append(row)
        finally:
            pbar.close()
        summary["history"] = history
        return best_keys


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))
