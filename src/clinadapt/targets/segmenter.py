"""Targets of promptable segmenters (SAM, MedSAM, SAM 2): the image encoder, the mask decoder,
the prompt encoder, and Medical-SAM-Adapter's adapters in the image-encoder blocks.

The image-encoder targets shared with classification work on a segmenter too: ``lora`` (peft
LoRA on the encoder's fused ``qkv``, as SAMed adapts the image encoder; SAMed's separate q/v
updates of rank r have the same 4·r·d parameters per block, but leave k alone), ``adapter``,
``norm``, ``bias`` and ``full``. Published recipes are combinations: MedSAM
``image-encoder+decoder`` (prompt encoder frozen), SAMed ``lora+decoder+prompt-encoder``,
Medical-SAM-Adapter ``sam-adapter+decoder+prompt-encoder``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.targets._arch import backbone, find_blocks, linear_dims, model_name
from clinadapt.targets.base import TARGETS, Target, TargetOptions


def _part(model: nn.Module, attr: str, target: str) -> nn.Module:
    part = getattr(model, attr, None)
    if not isinstance(part, nn.Module):
        raise IncompatibleError(
            f"target {target!r} needs a promptable segmenter (SAM, MedSAM, SAM 2) with a "
            f"{attr}; model {model_name(model)!r} has none"
        )
    return part


@TARGETS.register("image-encoder")
class ImageEncoderTarget(Target):
    """Train the whole image encoder (a classifier's backbone, a segmenter's encoder)."""

    name = "image-encoder"

    def apply(self, model: nn.Module) -> None:
        for p in backbone(model).parameters():
            p.requires_grad_(True)


@TARGETS.register("decoder")
class DecoderTarget(Target):
    """Train the mask decoder: two-way transformer, upscaling, hypernetwork MLPs, IoU head."""

    name = "decoder"

    def apply(self, model: nn.Module) -> None:
        for p in _part(model, "mask_decoder", self.name).parameters():
            p.requires_grad_(True)


@TARGETS.register("prompt-encoder")
class PromptEncoderTarget(Target):
    """Train the point/box/mask embeddings (the Fourier position matrix stays fixed, as in SAM)."""

    name = "prompt-encoder"

    def apply(self, model: nn.Module) -> None:
        for p in _part(model, "prompt_encoder", self.name).parameters():
            p.requires_grad_(True)
        default = getattr(model, "default_prompt", None)
        if isinstance(default, nn.Module):
            for p in default.parameters():
                p.requires_grad_(True)


class SamAdapterOptions(TargetOptions):
    mlp_ratio: float = Field(
        0.25, gt=0, description="adapter width / block width (Medical-SAM-Adapter: 0.25)"
    )
    scale: float = Field(
        0.5, description="multiplier of the MLP adapter (Medical-SAM-Adapter: 0.5)"
    )
    zero_init: bool = Field(
        False,
        description="start the up-projections at zero, so the adapted model starts equal to the "
        "base (Medical-SAM-Adapter: PyTorch's default Linear init)",
    )


class SamAdapter(nn.Module):
    """Medical-SAM-Adapter's ``Adapter``: fc1 -> GELU -> fc2, with or without the skip."""

    def __init__(self, dim: int, hidden: int, skip: bool, scale: float, zero_init: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.skip = skip
        self.scale = float(scale)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(x)))
        return x + y if self.skip else y * self.scale


class _AttnAdapterHook:
    """Space adapter after the attention (before the residual): ``x + adapter(x)``."""

    def __init__(self, adapter: SamAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, tuple):
            return (self.adapter(output[0]), *output[1:])
        return self.adapter(output)  # type: ignore[arg-type]


class _MlpAdapterHook:
    """MLP adapter beside the MLP, on its (normalised) input: ``mlp(x) + scale * adapter(x)``."""

    def __init__(self, adapter: SamAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.adapter(args[0])


def _width(module: nn.Module, what: str, where: str) -> int:
    proj = getattr(module, "proj", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    raise IncompatibleError(f"target 'sam-adapter': {where}.{what} has no output projection")


@TARGETS.register("sam-adapter")
class SamAdapterTarget(Target):
    """Medical-SAM-Adapter (Wu et al., Med. Image Anal. 2025), 2D: per image-encoder block,
    ``x = attn(norm1(x)); x = x + Space_Adapter(x)`` before the residual, and
    ``x = x + mlp(xn) + 0.5 * MLP_Adapter(xn)`` with ``xn = norm2(x)``; each adapter is
    D -> 0.25 D -> D with GELU. Only the adapters train (combine with ``decoder`` and
    ``prompt-encoder`` for the paper's recipe, which trains those too).
    """

    name = "sam-adapter"
    Options = SamAdapterOptions

    def apply(
        self,
        model: nn.Module,
        mlp_ratio: float = 0.25,
        scale: float = 0.5,
        zero_init: bool = False,
    ) -> None:
        module = backbone(model)
        name = model_name(model)
        blocks = find_blocks(module)
        usable = (
            [
                (n, b)
                for n, b in zip(blocks.names, blocks.modules, strict=True)
                if isinstance(getattr(b, "attn", None), nn.Module)
                and isinstance(getattr(b, "mlp", None), nn.Module)
            ]
            if blocks
            else []
        )
        if not usable:
            raise IncompatibleError(
                f"target 'sam-adapter': model {name!r} has no transformer blocks with attn and "
                "mlp; it is meant for SAM's image encoder"
            )
        wanted = (float(mlp_ratio), float(scale))
        for where, block in usable:
            existing = getattr(block, "sam_attn_adapter", None)
            if isinstance(existing, SamAdapter):
                if getattr(block, "_sam_adapter_options", None) != wanted:
                    raise ConfigError(
                        f"target 'sam-adapter': model {name!r} already has adapters of another "
                        f"configuration at {where}"
                    )
            else:
                dim = _width(block.attn, "attn", where)
                d_in, d_out = linear_dims(block.mlp)
                if d_in != d_out:
                    raise IncompatibleError(
                        f"target 'sam-adapter': the MLP of {where} maps {d_in} to {d_out} features"
                    )
                ref = next(block.parameters())
                attn_ad = SamAdapter(dim, int(dim * mlp_ratio), True, 1.0, zero_init)
                mlp_ad = SamAdapter(d_in, int(d_in * mlp_ratio), False, scale, zero_init)
                block.add_module("sam_attn_adapter", attn_ad.to(ref.device, ref.dtype))
                block.add_module("sam_mlp_adapter", mlp_ad.to(ref.device, ref.dtype))
                block._sam_adapter_options = wanted
                block.attn.register_forward_hook(_AttnAdapterHook(attn_ad))
                block.mlp.register_forward_hook(_MlpAdapterHook(mlp_ad))
            for p in (*block.sam_attn_adapter.parameters(), *block.sam_mlp_adapter.parameters()):
                p.requires_grad_(True)
