"""`vnl`: variational neighbour labels (Ambekar, Xiao, Shen, Zhen and Snoek, "Probabilistic
Test-Time Generalization by Variational Neighbor-Labeling", arXiv 2307.04033, 2023).

The pseudo-label of a test image is a distribution, not an argmax: the model's softmax p_i,
refined with the predictions of its neighbours in feature space,
``q_i = lam * p_i + (1 - lam) * sum_j a_ij p_j``, with a_ij the softmax over the k nearest
neighbours (cosine similarity / tau) among the batch and a memory of recent target samples.
The model is then trained toward q: the expected log-likelihood of a pseudo-label drawn from q,
i.e. the cross-entropy -sum_k q_ik log p_theta(k | x_i), computed exactly instead of by sampling.
The paper learns the neighbour-label inference model in a meta-generalization stage at source
time; here neighbours are aggregated without learnt parameters, so any source model can be used.
State: the adapted parameters, the optimizer and the memory of (feature, prediction) pairs.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
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
)


class VNLOptions(StreamOptions):
    neighbours: int = Field(5, ge=1, description="neighbours k that label each sample")
    temperature: float = Field(0.1, gt=0, description="softmax temperature over similarities")
    self_weight: float = Field(
        0.5, ge=0, le=1, description="weight lam of the sample's own prediction in its label"
    )
    memory: int = Field(256, ge=0, description="recent target samples kept as neighbours")


@torch.no_grad()
def neighbour_labels(
    feats: torch.Tensor,
    probs: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_probs: torch.Tensor,
    k: int,
    temperature: float,
    self_weight: float,
) -> torch.Tensor:
    """Refined label distributions (N, K) of the batch from its neighbours (batch + bank)."""
    all_f = F.normalize(torch.cat([feats, bank_feats]), dim=1)
    all_p = torch.cat([probs, bank_probs])
    sim = F.normalize(feats, dim=1) @ all_f.T
    n = len(feats)
    sim[torch.arange(n), torch.arange(n)] = -float("inf")  # a sample is not its own neighbour
    k = min(k, len(all_f) - 1)
    if k < 1:
        return probs.clone()
    top, idx = sim.topk(k, dim=1)
    weights = (top / temperature).softmax(1)
    neigh = (weights.unsqueeze(-1) * all_p[idx]).sum(1)
    return self_weight * probs + (1 - self_weight) * neigh


class VNLAdapter(Adapter):
    """VNL: train toward the neighbour-refined soft pseudo-labels of each batch."""

    def __init__(
        self, model: ImageClassifier, optimizer: torch.optim.Optimizer, options: VNLOptions
    ) -> None:
        super().__init__(model, optimizer)
        self.options = options
        self.bank: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    def on_reset(self) -> None:
        self.bank.clear()

    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        o = self.options
        updates = 0
        for _ in range(o.steps):
            feats = self.model.features(x)
            logits = self.model.head(feats)
            probs = logits.detach().softmax(1)
            if self.bank:
                bank_f = torch.cat([b[0] for b in self.bank])
                bank_p = torch.cat([b[1] for b in self.bank])
            else:
                bank_f, bank_p = feats[:0].detach(), probs[:0]
            q = neighbour_labels(
                feats.detach(), probs, bank_f, bank_p, o.neighbours, o.temperature, o.self_weight
            )
            loss = -(q * logits.log_softmax(1)).sum(1).mean()
            if torch.isfinite(loss):
                loss.backward()
                self.optimizer.step()
                updates += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.bank.append((feats.detach(), probs))
        while self.bank and sum(len(b[0]) for b in self.bank) > o.memory:
            self.bank.popleft()
        return Step(logits, loss.detach(), updates=updates, used=len(x))


@METHODS.register("vnl")
class VNL(StreamMethod):
    """Adapt toward pseudo-label distributions refined by neighbouring test samples."""

    name = "vnl"
    default_target = "norm"
    Options = VNLOptions

    def build(
        self, model: ImageClassifier, num_classes: int, options: VNLOptions, ctx: Context
    ) -> VNLAdapter:
        configure_model(model, resolve_bn_prior(options, ctx))
        params = collect_params(model)
        check_model(model, params, self.name)
        return VNLAdapter(model, make_optimizer(params, options), options)
