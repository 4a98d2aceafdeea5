"""Where things are inside a backbone: its block list, MLPs and projections, for every family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Containers of repeated blocks, tried in order (timm ViT / open_clip timm towers, open_clip
# ViT, transformers CLIP, DINOv2 / ViT / BERT-like, MAE / SAM, timm Swin, ConvNeXt-like and the 3D
# CNNs and Swin encoder (stages); SAM 2's Hiera trunk; Primus's EVA).
BLOCK_PATHS = (
    "blocks",
    "trunk.blocks",
    "transformer.resblocks",
    "vision_model.encoder.layers",
    "encoder.layer",
    "encoder.layers",
    "vision_encoder.layers",
    "layers",
    "stages",
    "backbone.blocks",
    "eva.blocks",
)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def model_name(model: nn.Module) -> str:
    """The registered name of the backbone inside ``model`` (or of a segmenter itself)."""
    for owner in (getattr(model, "encoder", None), model):
        name = getattr(owner, "name", None)
        if isinstance(name, str):
            return name
    return type(model).__name__


def backbone(model: nn.Module) -> nn.Module:
    """The image encoder of a classifier or a segmenter (or ``model`` itself)."""
    encoder = getattr(model, "encoder", None)
    return getattr(encoder, "image_encoder", encoder) if encoder is not None else model


def get_path(module: nn.Module, path: str) -> nn.Module | None:
    """``module.a.b`` for ``path="a.b"``, or None when any step is missing."""
    node: object = module
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a backbone, in forward order, and their qualified names."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    def __len__(self) -> int:
        return len(self.modules)


def find_blocks(module: nn.Module) -> Blocks | None:
    """The block list of ``module`` (ViT blocks, Swin stages, ResNet layer1..4, HF layers)."""
    if all(isinstance(get_path(module, s), nn.Module) for s in RESNET_STAGES):
        return Blocks(RESNET_STAGES, tuple(get_path(module, s) for s in RESNET_STAGES))
    for path in BLOCK_PATHS:
        node = get_path(module, path)
        if isinstance(node, (nn.ModuleList, nn.Sequential)) and len(node) > 0:
            names = tuple(f"{path}.{i}" for i in range(len(node)))
            return Blocks(names, tuple(node))
    return None


def block_prefixes(module: nn.Module) -> tuple[str, ...]:
    """Qualified names of the blocks, each ending in a dot (for prefix tests)."""
    blocks = find_blocks(module)
    return tuple(n + "." for n in blocks.names) if blocks else ()


def is_timm_vit(module: nn.Module) -> bool:
    """A timm VisionTransformer-like model: patch tokens through a ``blocks`` Sequential."""
    return (
        isinstance(getattr(module, "blocks", None), nn.Sequential)
        and hasattr(module, "num_prefix_tokens")
        and hasattr(module, "patch_embed")
        and hasattr(module, "embed_dim")
    )


def timm_vit(module: nn.Module) -> nn.Module | None:
    """The timm ViT in ``module``: itself, or the ``trunk`` of an open_clip timm tower."""
    for candidate in (module, getattr(module, "trunk", None)):
        if isinstance(candidate, nn.Module) and is_timm_vit(candidate):
            return candidate
    return None


def mlp_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MLP sub-module (attribute ``mlp``) of every transformer block, outermost only."""
    prefixes = block_prefixes(module)
    out: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp" or not name.startswith(prefixes or ("\0",)):
            continue
        if any(name.startswith(n + ".") for n, _ in out):
            continue
        out.append((name, m))
    return out


def linear_dims(mlp: nn.Module) -> tuple[int, int]:
    """(input, output) width of an MLP from its first and last base Linear layers."""
    linears = [
        m
        for n, m in mlp.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in n and "adapter" not in n
    ]
    if not linears:
        raise ValueError(f"{type(mlp).__name__} has no Linear layer")
    return linears[0].in_features, linears[-1].out_features
