"""``lora``: low-rank updates of attention/MLP projections, injected through peft.

LoRA (Hu et al., ICLR 2022) adds ``B @ A`` (rank r, scaled by alpha / r) to a frozen weight;
``B`` starts at zero so the adapted model starts equal to the base. peft injects the layers in
place (``inject_adapter_in_model``), so the backbone keeps its own forward: timm's fused
``qkv``, open_clip's ``nn.MultiheadAttention`` (peft adapts its in- and out-projection), and
transformers' ``q_proj``/``v_proj``. After training, :func:`merge_lora` folds the update into the
base weights (same outputs, no extra cost), :func:`unmerge_lora` undoes it, and
:func:`merge_and_unload_lora` removes the peft wrappers altogether.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.targets._arch import backbone, block_prefixes, model_name
from clinadapt.targets.base import TARGETS, Target, TargetOptions

# Per family, the default projections: fused qkv (timm ViT/Swin, SAM, MONAI Swin), open_clip's
# attention module, and W_q, W_v for separate projections as in Hu et al. (2022, Sec. 7.1; timm's
# EVA blocks of Primus too); a CNN gets its block convolutions (peft's Conv2d/Conv3d LoRA: ResNet
# and STU-Net name them conv1..3, nnU-Net's ResEnc wraps each as ``conv`` in its conv units).
DEFAULT_MODULES: tuple[tuple[str, ...], ...] = (
    ("qkv",),
    ("attn",),
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("conv1", "conv2", "conv3"),
    ("conv",),
)
SUPPORTED = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
_ATTR = "_clinadapt_lora"


class LoraOptions(TargetOptions):
    rank: int = Field(8, ge=1, description="rank r of each low-rank update (peft's default 8)")
    alpha: float = Field(8.0, gt=0, description="scale numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: list[str] | None = Field(
        None,
        description="module names (last name part or dotted suffix) inside the blocks to adapt; "
        "default per family: qkv (timm, SAM), attn (open_clip), q_proj+v_proj (transformers)",
    )


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def candidate_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Layers inside the blocks that peft can adapt, by qualified name."""
    prefixes = block_prefixes(module)
    if not prefixes:
        return {}
    out: dict[str, nn.Module] = {}
    mha = [n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, m in module.named_modules():
        if not isinstance(m, SUPPORTED) or not name.startswith(prefixes):
            continue
        if any(name.startswith(a + ".") for a in mha):
            continue  # an MHA's out_proj is adapted with the MHA itself (its forward is unused)
        out[name] = m
    return out


def resolve_modules(module: nn.Module, patterns: list[str] | None, name: str) -> list[str]:
    """Qualified names of the layers to adapt; the family default when ``patterns`` is None."""
    candidates = candidate_modules(module)
    if patterns is None:
        for default in DEFAULT_MODULES:
            chosen = [n for n in candidates if any(_matches(n, p) for p in default)]
            if chosen:
                return chosen
        raise IncompatibleError(
            f"target 'lora': model {name!r} has no layer LoRA knows how to adapt inside its "
            "blocks; give target_options.target_modules"
        )
    chosen = [n for n in candidates if any(_matches(n, p) for p in patterns)]
    if not chosen:
        known = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise IncompatibleError(
            f"target 'lora': target_modules {patterns} match no Linear/Conv2d/attention layer "
            f"in the blocks of model {name!r}; layer names there: {', '.join(known) or 'none'}"
        )
    return chosen


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost peft LoRA layers in ``model`` (an MHA layer holds its out_proj's)."""
    from peft.tuners.lora import LoraLayer

    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and not any(name.startswith(n + ".") for n, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def _reregister(layer: nn.Module) -> None:
    # peft's MHA layer swaps its weights for plain tensors when merging; keep them parameters
    restore = getattr(layer, "_restore_weights", None)
    if restore is not None:
        restore()


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight; return how many layers were merged."""
    n = 0
    for layer in lora_layers(model):
        if not layer.merged:
            layer.merge()
            _reregister(layer)
            n += 1
    return n


def unmerge_lora(model: nn.Module) -> int:
    """Take merged LoRA updates back out of the base weights; return how many layers."""
    n = 0
    for layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
            n += 1
    return n


def merge_and_unload_lora(model: nn.Module) -> int:
    """Merge LoRA into the base weights and put the plain layers back (irreversible)."""
    return _unload(model, merge=True)


def unload_lora(model: nn.Module) -> int:
    """Put the plain layers back without the LoRA update (the base model again); return how
    many layers. A merged layer is unmerged first."""
    return _unload(model, merge=False)


def _unload(model: nn.Module, merge: bool) -> int:
    names = {id(m): n for n, m in model.named_modules()}
    layers = lora_layers(model)
    for layer in layers:
        if not merge and layer.merged:
            layer.unmerge()
        if hasattr(layer, "unload_and_optionally_merge_module"):
            plain = layer.unload_and_optionally_merge_module(
                merge=merge and not layer.merged, safe_merge=False, adapter_names=None
            )
        else:
            if merge and not layer.merged:
                layer.merge()
            plain = layer.get_base_layer()
        parent_name, _, attr = names[id(layer)].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, plain)
    for m in model.modules():
        if hasattr(m, _ATTR):
            delattr(m, _ATTR)
    return len(layers)


@TARGETS.register("lora")
class LoraTarget(Target):
    """Inject LoRA into the backbone's projections and train only the low-rank factors."""

    name = "lora"
    Options = LoraOptions

    def apply(
        self,
        model: nn.Module,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
    ) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        module = backbone(model)
        name = model_name(model)
        wanted = {
            "rank": rank,
            "alpha": alpha,
            "dropout": dropout,
            "target_modules": target_modules,
        }
        existing = getattr(module, _ATTR, None)
        if existing is not None:  # already injected (e.g. a source model re-targeted)
            if existing != wanted:
                raise ConfigError(
                    f"target 'lora': model {name!r} already carries LoRA with {existing}; "
                    f"cannot inject again with {wanted}"
                )
        else:
            modules = resolve_modules(module, target_modules, name)
            config = LoraConfig(
                r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules
            )
            try:
                inject_adapter_in_model(config, module)
            except (ValueError, TypeError) as e:
                raise IncompatibleError(
                    f"target 'lora' on model {name!r}: peft refused: {e}"
                ) from e
            setattr(module, _ATTR, wanted)
        for n, p in module.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
