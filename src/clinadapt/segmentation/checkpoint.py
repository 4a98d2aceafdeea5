"""segment-anything checkpoints (``sam_vit_b_01ec64.pth``, MedSAM's ``medsam_vit_b.pth``) on
transformers' ``SamModel``, by a key mapping.

Why a mapping rather than the ``segment-anything`` package: the mapped weights land in the same
transformers model that every other SAM path uses, so the targets (LoRA, adapters, decoder),
test-time methods, adapted-weight files and preprocessing work on one module tree whatever
format the checkpoint came in, and no unmaintained package is needed at run time. The mapping is
tested against ``segment-anything`` itself: a tiny ``Sam`` saved in its key format, loaded here,
gives the same masks as the original model.

The checkpoint is read with ``torch.load(weights_only=True)`` (tensors only, no code).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from clinadapt.errors import IncompatibleError, WeightsUnavailableError
from clinadapt.models._weights import load_failure, torch_load_tensors

# segment-anything name -> transformers name, applied in order (regular expressions).
_RULES: tuple[tuple[str, str], ...] = (
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.pos_embed$", "vision_encoder.pos_embed"),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.(\d+)\.", r"vision_encoder.layers.\1."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^prompt_encoder\.point_embeddings\.(\d)\.", r"prompt_encoder.point_embed.\1."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (
        r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.",
        r"mask_decoder.transformer.layers.\1.layer_norm\2.",
    ),
    (
        r"^mask_decoder\.transformer\.norm_final_attn\.",
        "mask_decoder.transformer.layer_norm_final_attn.",
    ),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
)
_PE = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
# segment-anything's MLP(num_layers=3).layers.{0,1,2} -> transformers' proj_in, layers.0, proj_out
_MLP = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$"
)
# keys that segment-anything keeps and transformers does not (non-persistent in SAM itself)
_IGNORED = ("pixel_mean", "pixel_std")


def is_segment_anything_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True when ``state`` uses segment-anything's names (``image_encoder.blocks...``)."""
    return any(k.startswith("image_encoder.") for k in state) and any(
        k.startswith("mask_decoder.") for k in state
    )


def _mlp_depths(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for key in state:
        m = _MLP.match(key)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    return depth


def map_segment_anything_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a segment-anything state dict to transformers' ``SamModel`` keys."""
    depth = _mlp_depths(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key == _PE:
            out["shared_image_embedding.positional_embedding"] = value
            out["prompt_encoder.shared_embedding.positional_embedding"] = value
            continue
        m = _MLP.match(key)
        if m:
            prefix, i, rest = m.group(1), int(m.group(2)), m.group(3)
            last = depth[prefix] - 1
            name = "proj_in" if i == 0 else "proj_out" if i == last else f"layers.{i - 1}"
            out[f"{prefix}.{name}.{rest}"] = value
            continue
        new = key
        for pattern, repl in _RULES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
    return out


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or ``torch.load(weights_only=True)``.

    Training checkpoints that wrap the weights (``{"model": ...}``, ``{"state_dict": ...}``)
    and DistributedDataParallel's ``module.`` prefix are unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"checkpoint {str(p)!r} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch_load_tensors(p)
    except Exception as e:  # pickle refusals and corrupt files alike: one line naming the file
        raise IncompatibleError(load_failure(p, "a tensors-only checkpoint", e)) from e
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise IncompatibleError(f"{p}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def describe_encoder(state: Mapping[str, torch.Tensor]) -> str:
    """'ViT-B' / 'ViT-L' / 'ViT-H' (or the width) of a segment-anything image encoder."""
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return "unknown"
    return {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}.get(int(w.shape[0]), f"width {w.shape[0]}")


def load_segment_anything(model: torch.nn.Module, path: str | os.PathLike[str], name: str) -> None:
    """Load a segment-anything checkpoint into a transformers ``SamModel`` of the same size."""
    state = read_state(path)
    if not is_segment_anything_state(state):
        raise IncompatibleError(
            f"{path}: not a segment-anything checkpoint (no image_encoder./mask_decoder. keys); "
            "a transformers checkpoint goes in a folder with its config.json"
        )
    mapped = map_segment_anything_state(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = [k for k in mapped if k in own and tuple(mapped[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        size = describe_encoder(state)
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape differs for {wrong[:3]}" if wrong else "",
            )
            if part
        )
        raise IncompatibleError(
            f"{path} holds a SAM {size} image encoder that does not fit segmenter {name!r} "
            f"({detail}); pick the segmenter of that size (sam-vit-b / medsam, sam-vit-l, "
            "sam-vit-h)"
        )
    model.load_state_dict(mapped, strict=True)
