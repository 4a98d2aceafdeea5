"""`eata`: efficient anti-forgetting test-time adaptation (Niu et al., "Efficient Test-Time Model
Adaptation without Forgetting", ICML 2022).

Entropy minimisation on the samples that pass two filters: reliable (entropy below
E0 = 0.4 ln K) and non-redundant (|cosine| between the sample's probability vector and a moving
average of the probabilities of earlier selected samples below ``d_margin``). Each selected
sample is weighted by 1 / exp(entropy - E0). A Fisher regulariser, computed once on a few source
(validation) images, keeps important parameters near their source values.
State: the adapted parameters, the optimizer and the moving average of probabilities; the
Fisher information and the source parameter values never change.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError
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

Fisher = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (fisher diagonal, source value)


class EATAOptions(StreamOptions):
    # Published defaults (EATA repository, ImageNet-C): SGD lr 2.5e-4 momentum 0.9 (not
    # Nesterov), e_margin = 0.4 * ln(1000) i.e. 0.4 ln K, d_margin 0.05, fisher_alpha 2000,
    # 2000 images. d_margin was set for K = 1000, where probability vectors of different samples
    # are nearly orthogonal; with few classes they rarely are (two 2-class probability vectors
    # have cosine >= 0.71 unless they point to different classes), so few samples pass the
    # redundancy filter: the record's trace and warnings show how many did.
    optimizer: Literal["adam", "sgd"] = Field("sgd", description="optimiser (paper: SGD)")
    lr: float = Field(2.5e-4, gt=0, description="learning rate (paper: 2.5e-4 for batch 64)")
    e_margin: float = Field(0.4, gt=0, description="reliability filter: entropy < e_margin * ln K")
    d_margin: float = Field(
        0.05, ge=0, description="redundancy filter: |cos(p, moving average)| < d_margin"
    )
    fisher_alpha: float = Field(2000.0, ge=0, description="weight of the Fisher regulariser")
    fisher_size: int = Field(2000, ge=1, description="source images to estimate the Fisher on")


def eata_masks(
    logits: torch.Tensor, e_margin: float, average: torch.Tensor | None, d_margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reliable, selected) boolean masks over the batch: entropy filter, then redundancy filter."""
    ent = softmax_entropy(logits.detach())
    reliable = ent < e_margin
    selected = reliable.clone()
    if average is not None:
        cos = F.cosine_similarity(logits.detach().softmax(1), average.unsqueeze(0), dim=1)
        selected &= cos.abs() < d_margin
    return reliable, selected


def fisher_diagonal(
    model: ImageClassifier, source: ClinicalDataset, size: int, batch_size: int, device: str
) -> Fisher:
    """Mean over source batches of the squared gradient of the cross-entropy to the model's own
    predicted labels (EATA's estimate), for every trainable parameter."""
    source = source.subset(range(min(size, len(source))))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = 0
    for x, _, _ in source.batches(model.preprocess, batch_size, device=device):
        logits = model(x.to(device))
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.detach() ** 2
        model.zero_grad(set_to_none=True)
        batches += 1
    return {n: (acc[n] / batches, params[n].detach().clone()) for n in params}


class EATAAdapter(Adapter):
    """EATA: weighted entropy on reliable, non-redundant samples plus the Fisher penalty."""

    def __init__(
        self,
        model: ImageClassifier,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        options: EATAOptions,
        fisher: Fisher | None,
    ) -> None:
        super().__init__(model, optimizer)
        self.e_margin = options.e_margin * math.log(num_classes)
        self.d_margin = options.d_margin
        self.alpha = options.fisher_alpha
        self.fisher = fisher or {}
        self.steps = options.steps
        self.params = dict(model.named_parameters())
        self.average: torch.Tensor | None = None  # moving average of selected probabilities

    def on_reset(self) -> None:
        self.average = None

    def fisher_penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for name, (fisher, source) in self.fisher.items():
            total = total + (fisher * (self.params[name] - source) ** 2).sum()
        return self.alpha * total

    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        loss = None
        updates = 0
        for _ in range(self.steps):
            logits = self.model(x)
            reliable, selected = eata_masks(logits, self.e_margin, self.average, self.d_margin)
            used, n_reliable = int(selected.sum()), int(reliable.sum())
            if not used:  # the authors' code skips the step when nothing is selected
                continue
            ent = softmax_entropy(logits[selected])
            probs = logits[selected].detach().softmax(1).mean(0)
            self.average = probs if self.average is None else 0.9 * self.average + 0.1 * probs
            coeff = 1.0 / torch.exp(ent.detach() - self.e_margin)
            loss = (ent * coeff).mean() + self.fisher_penalty()
            if torch.isfinite(loss):
                loss.backward()
                self.optimizer.step()
                updates += 1
            self.optimizer.zero_grad(set_to_none=True)
        return Step(
            logits,
            None if loss is None else loss.detach(),
            updates=updates,
            used=used,
            reliable=n_reliable,
        )


@METHODS.register("eata")
class EATA(StreamMethod):
    """Adapt on reliable, non-redundant samples; stay close to the source where it matters."""

    name = "eata"
    default_target = "norm"
    Options = EATAOptions

    def __init__(self) -> None:
        self.fisher: Fisher | None = None

    def prepare(
        self,
        model: ImageClassifier,
        source: ClinicalDataset | None,
        options: EATAOptions,
        ctx: Context,
    ) -> None:
        """Estimate the Fisher information on up to ``fisher_size`` source images."""
        self.fisher = None
        if options.fisher_alpha == 0:
            return
        if source is None:
            raise ConfigError(
                "eata: the Fisher regulariser needs source images (a validation split); "
                "set method_options.fisher_alpha=0 to run without it"
            )
        net = copy.deepcopy(model)
        configure_model(net, resolve_bn_prior(options, ctx))
        self.fisher = fisher_diagonal(
            net,
            source,
            options.fisher_size,
            ctx.batch_size if ctx.batch_size > 1 else 64,
            ctx.device,
        )

    def build(
        self, model: ImageClassifier, num_classes: int, options: EATAOptions, ctx: Context
    ) -> EATAAdapter:
        if options.fisher_alpha > 0 and self.fisher is None:
            raise ConfigError(
                "eata: call prepare(model, source_images, options, ctx) first to estimate the "
                "Fisher information, or set fisher_alpha=0"
            )
        configure_model(model, resolve_bn_prior(options, ctx))
        params = collect_params(model)
        check_model(model, params, self.name)
        fisher = self.fisher if options.fisher_alpha > 0 else None
        return EATAAdapter(model, make_optimizer(params, options), num_classes, options, fisher)
