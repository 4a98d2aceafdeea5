"""``prompt``: visual prompt tuning (VPT, Jia et al., ECCV 2022) for timm Vision Transformers.

``n_tokens`` learnable tokens are inserted after the class/register tokens, before the patch
tokens. Shallow: one set enters before the first block and flows through. Deep: every block
gets its own set, replacing the previous block's prompt outputs. The prompt tokens are removed
after the last block, so pooling (class token or mean of patches) sees the same tokens as the
base model. Hooks on the blocks do the inserting, so the base parameter names do not change.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.targets._arch import backbone, model_name, timm_vit
from clinadapt.targets.base import TARGETS, Target, TargetOptions

Depth = Literal["shallow", "deep"]


class PromptOptions(TargetOptions):
    n_tokens: int = Field(10, ge=1, description="learnable prompt tokens per prompted layer")
    depth: Depth = Field(
        "deep", description="shallow: prompts before the first block only; deep: at every block"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the prompt tokens")


class PromptTokens(nn.Module):
    """The prompt tokens of one block and where they go in the token sequence."""

    def __init__(
        self, n_tokens: int, dim: int, offset: int, insert: bool, init_bound: float, p: float
    ) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(1, n_tokens, dim).uniform_(-init_bound, init_bound))
        self.offset = offset
        self.insert = insert
        self.dropout = nn.Dropout(p)

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[1]

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """Insert (first block) or overwrite (deeper blocks) the prompts in ``x`` (N, L, D)."""
        prompts = self.dropout(self.tokens).expand(x.shape[0], -1, -1).to(x.dtype)
        head = x[:, : self.offset]
        tail = x[:, self.offset :] if self.insert else x[:, self.offset + self.n_tokens :]
        return torch.cat([head, prompts, tail], dim=1)


def _place_hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x, *rest = args
    return (block.prompt.place(x), *rest), kwargs


def _strip_hook(blocks: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    first = blocks[0].prompt
    return torch.cat([output[:, : first.offset], output[:, first.offset + first.n_tokens :]], dim=1)


def prompt_modules(model: nn.Module) -> list[PromptTokens]:
    """Every set of prompt tokens in ``model``, first block first."""
    return [m for m in model.modules() if isinstance(m, PromptTokens)]


@TARGETS.register("prompt")
class PromptTarget(Target):
    """Insert learnable prompt tokens into a timm ViT and train only them."""

    name = "prompt"
    Options = PromptOptions

    def apply(
        self, model: nn.Module, n_tokens: int = 10, depth: Depth = "deep", dropout: float = 0.0
    ) -> None:
        name = model_name(model)
        vit = timm_vit(backbone(model))
        if vit is None:
            raise IncompatibleError(
                f"target 'prompt' needs a timm Vision Transformer (token blocks); model {name!r} "
                f"is a {type(backbone(model)).__name__}"
            )
        blocks = vit.blocks
        existing = getattr(blocks[0], "prompt", None)
        if isinstance(existing, PromptTokens):  # already inserted (a source model re-targeted)
            is_deep = isinstance(getattr(blocks[-1], "prompt", None), PromptTokens)
            if (existing.n_tokens, "deep" if is_deep else "shallow") != (n_tokens, depth):
                raise ConfigError(
                    f"target 'prompt': model {name!r} already has {existing.n_tokens} "
                    f"{'deep' if is_deep else 'shallow'} prompt tokens"
                )
        else:
            # VPT's init: uniform(-b, b), b = sqrt(6 / (3 * patch area + D)) (Jia et al. 2022)
            patch = vit.patch_embed.patch_size
            area = int(patch[0]) * int(patch[1]) if isinstance(patch, tuple) else int(patch) ** 2
            bound = math.sqrt(6.0 / (3 * area + vit.embed_dim))
            ref = vit.pos_embed if vit.pos_embed is not None else next(vit.parameters())
            prompted = range(len(blocks)) if depth == "deep" else range(1)
            for i in prompted:
                tokens = PromptTokens(
                    n_tokens, vit.embed_dim, vit.num_prefix_tokens, i == 0, bound, dropout
                )
                blocks[i].add_module("prompt", tokens.to(ref.device, ref.dtype))
                blocks[i].register_forward_pre_hook(_place_hook, with_kwargs=True)
            blocks.register_forward_hook(_strip_hook)
        for m in prompt_modules(vit):
            m.tokens.requires_grad_(True)
