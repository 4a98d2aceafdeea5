"""``text-prompt``: learnable text context for CLIP-like models (CoOp; DAPL's domain tokens).

Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022 (CoOp): the prompt of
class k is ``[SOS][v_1]...[v_M][CLASS_k].[EOS]`` where the context vectors v live in the token
embedding space and are the only trained parameters; both towers stay frozen. Defaults: M=16
context tokens, shared by all classes, initialised N(0, 0.02), or from the embeddings of a
phrase such as "a photo of a" (then M is the phrase's length).

Ge et al., "Domain Adaptation via Prompt Learning", IEEE TNNLS 2023 (DAPL) add, after the
shared context, domain-specific context tokens: the prompt of (domain d, class k) is
``[SOS][v_1..v_M][d_1..d_m][CLASS_k].[EOS]``. :meth:`PromptHead.add_domains` adds them.

The context enters the frozen text tower through a forward hook on its token-embedding table,
so the library's own forward (positions, masks, pooling, projection) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.models.base import FoundationModel
from clinadapt.targets._arch import model_name
from clinadapt.targets.base import TARGETS, Target, TargetOptions

DEFAULT_N_CTX = 16  # CoOp's default context length
CTX_INIT_STD = 0.02  # CoOp's random initialisation of context vectors
PLACEHOLDER = "X"


def class_words(name: str) -> str:
    """A class name as words (``pleural_effusion`` -> ``pleural effusion``), as zero-shot does."""
    return " ".join(name.replace("_", " ").split())


def encode_with_embeddings(
    encoder: FoundationModel, token_ids: torch.Tensor, embeds: torch.Tensor
) -> torch.Tensor:
    """Run the text tower on ``token_ids`` with ``embeds`` (B, L, W) as the token embeddings.

    The ids still decide padding masks and which position is pooled (the end-of-text token).
    """

    def replace(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.shape != embeds.shape:
            raise IncompatibleError(
                f"prompt embeddings {tuple(embeds.shape)} do not match the text tower's token "
                f"embeddings {tuple(out.shape)} of model {encoder.name!r}"
            )
        return embeds.to(out.dtype)

    handle = encoder.token_embedding.register_forward_hook(replace)
    try:
        return encoder.text_encoder(token_ids)
    finally:
        handle.remove()


def phrase_embeddings(encoder: FoundationModel, phrase: str) -> torch.Tensor:
    """(M, W) token embeddings of ``phrase`` without its start/end tokens."""
    ids = encoder.tokenizer([phrase])[0]
    n = int((ids != 0).sum()) - 2  # drop SOS and EOS; 0 is the padding id of CLIP and BERT
    if n < 1:
        raise ConfigError(f"context init {phrase!r} holds no token")
    table = encoder.token_embedding
    with torch.no_grad():
        return table(ids[1 : 1 + n].to(table.weight.device)).detach().clone().float()


class PromptHead(nn.Module):
    """Logits ``scale * normalize(features) @ normalize(text(prompts)).T`` with learnable context.

    With domains, logits are (N, D, K) per domain inside :meth:`domain_logits`, and ``forward``
    returns the class marginal ``logsumexp`` over domains (the softmax over all D*K prompts,
    summed over domains), so prediction needs no domain label.
    """

    def __init__(
        self,
        encoder: FoundationModel,
        class_names: Sequence[str],
        n_ctx: int | None = None,
        class_specific: bool = False,
        init: str | None = None,
    ) -> None:
        super().__init__()
        if not encoder.has_text:
            raise IncompatibleError(
                f"text prompts need a CLIP-like model with a text tower; {encoder.name!r} has none"
            )
        self._encoder = (encoder,)  # not a submodule: the classifier already owns it
        self.class_names = [str(c) for c in class_names]
        self.class_specific = bool(class_specific)
        self.init = init
        self.scale = float(encoder.logit_scale)
        width = encoder.token_embedding.embedding_dim
        k = len(self.class_names)
        if init:
            vec = phrase_embeddings(encoder, init)
            if n_ctx is not None and n_ctx != len(vec):
                raise ConfigError(
                    f"n_ctx={n_ctx} disagrees with context init {init!r} ({len(vec)} tokens); "
                    "drop n_ctx (the phrase sets it)"
                )
            ctx = vec.unsqueeze(0).repeat(k, 1, 1) if class_specific else vec
        else:
            m = DEFAULT_N_CTX if n_ctx is None else int(n_ctx)
            if m < 1:
                raise ConfigError(f"n_ctx must be at least 1, got {m}")
            shape = (k, m, width) if class_specific else (m, width)
            ctx = torch.randn(shape) * CTX_INIT_STD
        self.ctx = nn.Parameter(ctx.to(encoder.token_embedding.weight.device))
        self.domain_ctx: nn.Parameter | None = None
        self.domain_names: list[str] = []
        self._tokenize()

    @property
    def encoder(self) -> FoundationModel:
        return self._encoder[0]

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[-2])

    @property
    def n_domain_ctx(self) -> int:
        return 0 if self.domain_ctx is None else int(self.domain_ctx.shape[1])

    @property
    def num_domains(self) -> int:
        return 0 if self.domain_ctx is None else int(self.domain_ctx.shape[0])

    def add_domains(self, names: Sequence[str], n_domain_ctx: int) -> None:
        """Add ``n_domain_ctx`` learnable tokens per domain after the shared context (DAPL)."""
        if self.domain_ctx is not None:
            raise ConfigError("this prompt head has domain contexts already")
        if not names or n_domain_ctx < 1:
            raise ConfigError(
                f"domain contexts need at least one domain and one token, got {list(names)} "
                f"and {n_domain_ctx}"
            )
        width = self.ctx.shape[-1]
        init = torch.randn(len(names), n_domain_ctx, width) * CTX_INIT_STD
        self.domain_ctx = nn.Parameter(init.to(self.ctx.device))
        self.domain_names = [str(n) for n in names]
        self._tokenize()

    def _tokenize(self) -> None:
        encoder = self.encoder
        n = self.n_ctx + self.n_domain_ctx
        prefix = " ".join([PLACEHOLDER] * n)
        prompts = [f"{prefix} {class_words(c)}." for c in self.class_names]
        ids = encoder.tokenizer(prompts).to(self.ctx.device)
        full = (ids != 0).sum(1) >= ids.shape[1]
        if bool(full.any()):
            name = self.class_names[int(full.nonzero()[0, 0])]
            raise ConfigError(
                f"the prompt of class {name!r} with {self.n_ctx} context and "
                f"{self.n_domain_ctx} domain tokens does not fit the {ids.shape[1]} positions of "
                f"the text tower of {encoder.name!r}; use fewer context tokens"
            )
        slots = ids[:, 1 : 1 + n]
        if not bool((slots == slots[0, 0]).all()):
            raise IncompatibleError(
                f"the tokenizer of {encoder.name!r} does not give one token per context slot; "
                "text prompts need a CLIP-BPE or WordPiece tokenizer"
            )
        self.register_buffer("token_ids", ids, persistent=False)

    def free_slots(self) -> int:
        """How many more context tokens the longest prompt could take before it is truncated."""
        used = int((self.token_ids != 0).sum(1).max())
        return self.token_ids.shape[1] - 1 - used

    def prompt_embeddings(self) -> torch.Tensor:
        """(P, L, W) token embeddings of every prompt, domain-major when there are domains."""
        table = self.encoder.token_embedding
        with torch.no_grad():
            base = table(self.token_ids).float()
        k = base.shape[0]
        n = self.n_ctx + self.n_domain_ctx
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(k, -1, -1)
        head, tail = base[:, :1], base[:, 1 + n :]
        if self.domain_ctx is None:
            return torch.cat([head, ctx, tail], dim=1)
        blocks = [
            torch.cat([head, ctx, dom.unsqueeze(0).expand(k, -1, -1), tail], dim=1)
            for dom in self.domain_ctx
        ]
        return torch.cat(blocks, dim=0)

    def text_features(self) -> torch.Tensor:
        """(P, D) unit-norm text features of the learned prompts."""
        embeds = self.prompt_embeddings()
        reps = max(1, self.num_domains)
        ids = self.token_ids.repeat(reps, 1)
        return F.normalize(encode_with_embeddings(self.encoder, ids, embeds).float(), dim=-1)

    def domain_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D, K) logits per domain block (D=1 without domains)."""
        text = self.text_features()
        logits = self.scale * F.normalize(features.float(), dim=-1) @ text.T
        return logits.view(features.shape[0], max(1, self.num_domains), len(self.class_names))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.domain_logits(features)
        return logits[:, 0] if logits.shape[1] == 1 else logits.logsumexp(dim=1)


class TextPromptOptions(TargetOptions):
    n_ctx: int | None = Field(
        None, ge=1, description="learnable context tokens (default 16, or the init phrase's)"
    )
    class_specific: bool = Field(
        False, description="one context per class (CoOp's CSC) instead of one shared context"
    )
    init: str | None = Field(
        None, description="initialise the context from this phrase, e.g. 'a photo of a'"
    )


@TARGETS.register("text-prompt")
class TextPromptTarget(Target):
    """Replace the head by a :class:`PromptHead`; only its context vectors are trainable."""

    name = "text-prompt"
    Options = TextPromptOptions

    def apply(
        self,
        model: nn.Module,
        n_ctx: int | None = None,
        class_specific: bool = False,
        init: str | None = None,
    ) -> None:
        encoder = getattr(model, "encoder", None)
        if encoder is None or not getattr(encoder, "has_text", False):
            raise IncompatibleError(
                f"target 'text-prompt' needs a CLIP-like model with a text tower; "
                f"{model_name(model)!r} has none"
            )
        names = getattr(model, "class_names", None)
        if not names:
            raise IncompatibleError(
                "target 'text-prompt' needs the class names: build the classifier as "
                "ImageClassifier(encoder, K, class_names=...)"
            )
        model.head = PromptHead(encoder, names, n_ctx, class_specific, init)
