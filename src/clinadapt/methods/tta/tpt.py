"""`tpt`: test-time prompt tuning (Shu et al., "Test-Time Prompt Tuning for Zero-Shot
Generalization in Vision-Language Models", NeurIPS 2022).

For each test image on its own: make 63 random views (random resized crop, scale 0.08-1, and
horizontal flip, plus AugMix when asked) besides the image itself; keep the 10% of the 64 with
the lowest prediction entropy (confidence selection); take one AdamW step (lr 5e-3) on the
entropy of their mean prediction with respect to the text context only; predict the original
image with the tuned context; then reset the context. Defaults are the paper's. The context
starts from the source's learned prompt (a CoOp or DAPL source) or from the embeddings of
"a photo of a" (a zero-shot source). The image tower is frozen, so each view is embedded once.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.data.loading import preprocess_on
from clinadapt.errors import IncompatibleError
from clinadapt.methods.base import (
    METHODS,
    Context,
    Options,
    StreamResult,
    TTAMethod,
    check_single_label,
)
from clinadapt.progress import progress
from clinadapt.targets.text_prompt import PromptHead


class TPTOptions(Options):
    views: int = Field(63, ge=1, description="augmented views per test image (paper: 63 + 1)")
    select: float = Field(
        0.1, gt=0, le=1, description="fraction of lowest-entropy views kept (paper: 0.1)"
    )
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate (paper: 5e-3)")
    steps: int = Field(1, ge=1, description="tuning steps per image (paper: 1)")
    init: str = Field(
        "a photo of a", description="context phrase when the source has no learned prompt"
    )
    min_scale: float = Field(
        0.08, gt=0, le=1, description="smallest crop area fraction (torchvision default)"
    )
    augmix: bool = Field(
        False, description="AugMix on top of the crops (the paper's fine-grained setting)"
    )


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax over the rows of ``logits`` (computed in log space)."""
    logp = logits.log_softmax(dim=-1)
    mean_logp = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    return -(mean_logp.exp() * mean_logp).sum()


def confident_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``fraction`` of rows with the lowest softmax entropy (at least one)."""
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    k = max(1, int(logits.shape[0] * fraction))
    return torch.argsort(ent, descending=False)[:k]


def view_transform(size: tuple[int, int], min_scale: float, augmix: bool):
    """The random view of TPT: resized crop and flip (and AugMix) on a uint8 (C,H,W) tensor."""
    from torchvision.transforms import v2

    ops = [
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augmix:
        ops.append(v2.AugMix(severity=1))  # TPT's augmix_ops use severity 1
    return v2.Compose(ops)


def make_views(image: np.ndarray, n: int, transform) -> list[np.ndarray]:
    """``image`` followed by ``n`` random views of it, all uint8 with the image's layout."""
    t = torch.as_tensor(image)
    grey = t.ndim == 2
    chw = t.unsqueeze(0) if grey else t.permute(2, 0, 1)
    out = [image]
    for _ in range(n):
        v = transform(chw)
        out.append((v[0] if grey else v.permute(1, 2, 0)).numpy())
    return out


def start_prompt(model: ImageClassifier, class_names: list[str], init: str) -> PromptHead:
    """A private copy of the source's prompt head, or a new one from ``init`` for zero-shot."""
    if isinstance(model.head, PromptHead):
        # share the (frozen) encoder instead of copying it with the head
        head = copy.deepcopy(model.head, {id(model.encoder): model.encoder})
        for p in head.parameters():  # a prompt head's parameters are its contexts
            p.requires_grad_(True)
        return head
    if not model.encoder.has_text or not bool(model.normalize_features):
        raise IncompatibleError(
            f"tpt tunes a text prompt of a CLIP-like source; model {model.encoder.name!r} with a "
            f"{type(model.head).__name__} head is not one. Train the source with "
            "--set source.method=zeroshot (or coop)"
        )
    return PromptHead(model.encoder, class_names, init=init)


@METHODS.register("tpt")
class TPT(TTAMethod):
    """Tune the text context on each test image's confident views, predict, reset."""

    name = "tpt"
    changes = "text prompt context (per image, reset)"
    # the paper tunes the prompt of CLIP zero-shot (and of CoOp): a source with a text prompt
    source_methods = ("zeroshot", "coop")
    single_label = True  # it minimises the softmax entropy of the averaged views
    default_target = "none"
    Options = TPTOptions

    def adapt(
        self, model: ImageClassifier, stream: ClinicalDataset, options: TPTOptions, ctx: Context
    ) -> StreamResult:
        check_single_label(self, stream)
        model.eval()
        head = start_prompt(model, stream.class_names, options.init).to(ctx.device)
        initial = [p.detach().clone() for p in head.parameters() if p.requires_grad]
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            for i in progress(range(len(stream)), f"tpt {stream.name}", total=len(stream)):
                image = stream.image(i)
                # views keep the image's own size; preprocessing then resizes all alike
                transform = view_transform(image.shape[:2], options.min_scale, options.augmix)
                views = make_views(image, options.views, transform)
                with torch.no_grad():
                    feats = model.encoder.encode_image(
                        preprocess_on(model.preprocess, views, ctx.device)
                    )
                out.append(tune_and_predict(head, initial, feats, options).cpu())
        return StreamResult.of(torch.cat(out), updates_per_image=options.steps)


def tune_and_predict(
    head: PromptHead, initial: list[torch.Tensor], feats: torch.Tensor, options: TPTOptions
) -> torch.Tensor:
    """Reset the context to ``initial``, tune it on the views' features, return (1, K) probs.

    ``feats[0]`` is the test image itself, the other rows its views.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, p0 in zip(params, initial, strict=True):
            p.copy_(p0)  # every image starts from the same context
    opt = torch.optim.AdamW(params, lr=options.lr)
    for _ in range(options.steps):
        logits = head(feats)
        keep = confident_views(logits.detach(), options.select)
        loss = marginal_entropy(logits[keep])
        # the gradient of the context only: the source model's own tensors stay untouched
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    with torch.no_grad():
        return torch.softmax(head(feats[:1]).float(), dim=-1)
