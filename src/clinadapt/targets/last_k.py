"""``last-k``: train the last k blocks of the backbone (and what follows them)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.targets._arch import backbone, find_blocks, model_name
from clinadapt.targets.base import TARGETS, Target, TargetOptions

# open_clip registers its output projection before the blocks; it still comes after them.
_LATE_PARAMETERS = ("proj",)


class LastKOptions(TargetOptions):
    k: int = Field(1, ge=1, description="how many of the final blocks (or stages) to train")
    include_final: bool = Field(
        True,
        description="also train what follows the last block (final norm, projection, SAM neck)",
    )


def after_blocks(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters outside the blocks that the forward pass uses after the last block."""
    blocks = find_blocks(module)
    if blocks is None:
        return []
    prefixes = tuple(n + "." for n in blocks.names)
    named = list(module.named_parameters())
    last = max((i for i, (n, _) in enumerate(named) if n.startswith(prefixes)), default=-1)
    return [
        (n, p)
        for i, (n, p) in enumerate(named)
        if not n.startswith(prefixes) and (i > last or n in _LATE_PARAMETERS)
    ]


@TARGETS.register("last-k")
class LastKTarget(Target):
    """Train the final ``k`` blocks of the backbone, and by default the layers after them."""

    name = "last-k"
    Options = LastKOptions

    def apply(self, model: nn.Module, k: int = 1, include_final: bool = True) -> None:
        module = backbone(model)
        blocks = find_blocks(module)
        if blocks is None:
            raise IncompatibleError(
                f"target 'last-k': model {model_name(model)!r} has no block list this target "
                "knows (ViT blocks, Swin layers, ResNet layer1..4, transformers layers)"
            )
        if k > len(blocks):
            raise ConfigError(
                f"target 'last-k': k={k} but model {model_name(model)!r} has only "
                f"{len(blocks)} blocks ({', '.join(blocks.names)})"
            )
        for block in blocks.modules[-k:]:
            for p in block.parameters():
                p.requires_grad_(True)
        if include_final:
            for _, p in after_blocks(module):
                p.requires_grad_(True)
