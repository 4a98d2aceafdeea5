"""`dapl`: domain adaptation via prompt learning (Ge et al., IEEE TNNLS 2023).

The prompt of (domain d, class k) is ``[SOS][shared context][context of domain d][CLASS_k].``
with frozen CLIP towers. Labelled source images train the source block with cross-entropy;
unlabelled target images train their own domain's block on pseudo-labels from frozen zero-shot
CLIP, kept where the zero-shot confidence (softmax at temperature T) reaches tau:

    loss = CE(source block, y) + U * sum_i mask_i CE(target block_i, pseudo_i) / sum_i mask_i

Defaults from the authors' code (LeapLabTHU/DAPrompt, ``train.py`` and ``ep25-32.yaml``):
16 shared and 16 domain tokens, T = 1.0, tau = 0.5, U = 1.0, SGD lr 0.003, 25 epochs, cosine
with one warm-up epoch; one step per labelled batch, target batches cycled.

Where the target comes from: the runner gives every shifted (non-source) test set of the shift
split, labels hidden, in ``Context.unlabelled`` (the transductive protocol of unsupervised
domain adaptation: those images are adapted to without labels, then evaluated). Each gets its
own domain context. Prediction uses the class marginal over all domain blocks (see
:class:`~clinadapt.targets.text_prompt.PromptHead`), so it needs no domain label at test time;
the authors' single-target code reads the target block instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ClinadaptError, ConfigError, IncompatibleError
from clinadapt.features import FeatureCache, resolve_cache_dir
from clinadapt.methods.base import METHODS, Context, FitMethod
from clinadapt.methods.budget import FewShotOptions
from clinadapt.methods.coop import epoch_lr, frozen_features, prompt_head
from clinadapt.methods.templates import templates_for
from clinadapt.methods.zeroshot import zeroshot_weights
from clinadapt.progress import bar

SOURCE_DOMAIN = "source"
DEFAULT_DOMAIN_CTX = 16  # N_DMX of the authors' configs


class DAPLOptions(FewShotOptions):
    target_domains: list[str] | None = Field(
        None, description="unlabelled target sets to adapt to (None: every shifted test set)"
    )
    n_domain_ctx: int | None = Field(
        None,
        ge=1,
        description="domain-specific context tokens per domain (default 16, or as many as the "
        "text tower still has room for after the shared context)",
    )
    tau: float = Field(0.5, ge=0, le=1, description="pseudo-label confidence threshold")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the pseudo-labels")
    weight_u: float = Field(1.0, ge=0, description="weight of the target pseudo-label loss")
    epochs: int = Field(25, ge=1, description="passes over the labelled source images")
    lr: float = Field(0.003, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    warmup_epochs: int = Field(1, ge=0, description="epochs at the constant warm-up lr 1e-5")


def pseudo_labels(
    zs_logits: torch.Tensor, tau: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max pseudo-labels of zero-shot logits and the mask of those with confidence >= tau."""
    probs = torch.softmax(zs_logits / temperature, dim=-1)
    conf, labels = probs.max(dim=-1)
    return labels, (conf >= tau).float()


def dapl_loss(
    source_logits: torch.Tensor,
    y: torch.Tensor,
    target_logits: torch.Tensor,
    pseudo: torch.Tensor,
    mask: torch.Tensor,
    weight_u: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, source CE, masked target CE) from per-block (B, K) logits.

    With no confident target image the target term is 0.
    """
    loss_x = F.cross_entropy(source_logits, y)
    ce = F.cross_entropy(target_logits, pseudo, reduction="none")
    kept = mask.sum()
    loss_u = (ce * mask).sum() / kept if kept > 0 else ce.sum() * 0.0
    return loss_x + weight_u * loss_u, loss_x, loss_u


def pick_targets(unlabelled: dict[str, ClinicalDataset], wanted: list[str] | None) -> list[str]:
    """The names of the unlabelled sets to adapt to; unknown names are an error."""
    if not unlabelled:
        raise IncompatibleError(
            "dapl needs unlabelled target images: run it with a shift that has shifted test sets "
            "(e.g. --shift domain), or give Context(unlabelled={name: dataset})"
        )
    if wanted is None:
        return sorted(unlabelled)
    unknown = [w for w in wanted if w not in unlabelled]
    if unknown or not wanted:
        raise ConfigError(
            f"dapl target_domains {wanted} must name unlabelled sets from {sorted(unlabelled)}"
        )
    return list(wanted)


@METHODS.register("dapl")
class DAPL(FitMethod):
    """Learn shared and per-domain prompt context from labelled source and unlabelled target."""

    name = "dapl"
    default_target = "text-prompt"
    Options = DAPLOptions
    uses_unlabelled: ClassVar[bool] = True

    def fit(
        self,
        model: ImageClassifier,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: DAPLOptions,
        ctx: Context,
    ) -> dict[str, Any]:
        head = prompt_head(model, "dapl")
        if train.task == "multilabel":
            raise IncompatibleError("dapl needs single-label data (pseudo-labels are arg-maxes)")
        names = pick_targets(ctx.unlabelled, options.target_domains)
        cache = FeatureCache(resolve_cache_dir(ctx.cache_dir))
        support = self.labelled_budget(train, val, options, ctx.seed).train
        src = frozen_features(model, support, ctx, cache)
        y = torch.as_tensor(support.labels, device=ctx.device)

        # pseudo-labels come from frozen zero-shot CLIP and so are fixed for the whole run
        zs = zeroshot_weights(model.encoder, train.class_names, templates_for(train.modality))
        zs = zs.to(ctx.device)
        tgt_feats, tgt_dom, pseudo, mask = [], [], [], []
        for d, name in enumerate(names, start=1):
            f = frozen_features(model, ctx.unlabelled[name], ctx, cache)
            logits = model.encoder.logit_scale * F.normalize(f, dim=-1) @ zs.T
            pl, m = pseudo_labels(logits, options.tau, options.temperature)
            tgt_feats.append(f)
            tgt_dom.append(torch.full((len(f),), d, device=ctx.device))
            pseudo.append(pl)
            mask.append(m)
        tf, td = torch.cat(tgt_feats), torch.cat(tgt_dom)
        pl_all, mask_all = torch.cat(pseudo), torch.cat(mask)

        n_dom = options.n_domain_ctx or min(DEFAULT_DOMAIN_CTX, head.free_slots())
        if n_dom < 1:
            raise ConfigError(
                f"dapl: no room for domain tokens in the text tower of {model.encoder.name!r} "
                f"after {head.n_ctx} shared context tokens; lower target_options.n_ctx"
            )
        head.add_domains([SOURCE_DOMAIN, *names], n_dom)
        params = [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
        )
        history = self._train(head, src, y, tf, td, pl_all, mask_all, opt, options, ctx)
        return {
            "history": history,
            "domains": [SOURCE_DOMAIN, *names],
            "source_images": len(support),
            "target_images": {n: len(ctx.unlabelled[n]) for n in names},
            "pseudo_label_rate": float(mask_all.mean()),
            "domain_context_tokens": n_dom,
            "domain_context_parameters": int(head.domain_ctx.numel()),
        }

    def _train(self, head, src, y, tf, td, pl, mask, opt, options, ctx) -> list[dict[str, float]]:
        bs = ctx.batch_size
        steps = -(-len(src) // bs)
        rng = np.random.default_rng(ctx.seed)
        u_order, u_at = rng.permutation(len(tf)), 0
        history = []
        pbar = bar(options.epochs * steps, "dapl")
        try:
            for epoch in range(options.epochs):
                for group in opt.param_groups:
                    group["lr"] = epoch_lr(epoch, options.epochs, options.lr, options.warmup_epochs)
                order = rng.permutation(len(src))
                rows = []
                for s in range(steps):
                    i = torch.as_tensor(order[s * bs : (s + 1) * bs], device=src.device)
                    if u_at + bs > len(u_order):  # cycle the target set, as Dassl's loader does
                        u_order, u_at = rng.permutation(len(tf)), 0
                    j = torch.as_tensor(u_order[u_at : u_at + bs], device=src.device)
                    u_at += bs
                    src_logits = head.domain_logits(src[i])[:, 0]
                    tgt_all = head.domain_logits(tf[j])
                    tgt_logits = tgt_all[torch.arange(len(j), device=src.device), td[j]]
                    loss, lx, lu = dapl_loss(
                        src_logits, y[i], tgt_logits, pl[j], mask[j], options.weight_u
                    )
                    if not torch.isfinite(loss):
                        raise ClinadaptError(
                            f"dapl: non-finite loss at epoch {epoch}; lower the learning rate"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    rows.append((loss.item(), lx.item(), lu.item()))
                    pbar.update(1)
                loss_m, lx_m, lu_m = np.mean(rows, axis=0).tolist()
                history.append({"epoch": epoch, "loss": loss_m, "loss_x": lx_m, "loss_u": lu_m})
                pbar.set_postfix(epoch=epoch, loss=f"{loss_m:.3f}")
        finally:
            pbar.close()
        return history

    def load_adapted(self, model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
        head = prompt_head(model, "dapl")
        dom = state.get("head.domain_ctx")
        if dom is None:
            raise IncompatibleError("dapl checkpoint holds no head.domain_ctx")
        if head.domain_ctx is None:
            head.add_domains([f"domain-{i}" for i in range(dom.shape[0])], int(dom.shape[1]))
        super().load_adapted(model, state)
