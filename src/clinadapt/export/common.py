"""What every export shares: which adapted models a library format can hold, and the metadata."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.errors import IncompatibleError
from clinadapt.fitted import Fitted
from clinadapt.store import atomic_path
from clinadapt.targets.lora import merge_and_unload_lora

#: the metadata file every export folder holds beside the library's own files
METADATA_FILE = "clinadapt_export.json"
#: the classification head, where the library's format has no place for it
HEAD_FILE = "clinadapt_head.safetensors"
#: targets whose changes are plain tensors of the library's own model (LoRA merges into them)
PLAIN_TARGETS = ("head", "norm", "bias", "full", "last-k", "lora", "image-encoder")


def target_parts(fitted: Fitted) -> list[str]:
    return [p.strip() for p in fitted.target.spec.split("+") if p.strip()]


def check_exportable(fitted: Fitted, fmt: str) -> None:
    """Refuse what a library format cannot hold, saying why and what works instead."""
    odd = [p for p in target_parts(fitted) if p not in PLAIN_TARGETS]
    if odd:
        raise IncompatibleError(
            f"target {'+'.join(odd)!r} adds modules that {fmt} models do not have (adapters, "
            "prompts, learned text context); only head, norm, bias, full, last-k and lora "
            "(merged, or as a PEFT adapter) export to a library format"
        )
    if not isinstance(fitted.model.head, nn.Linear):
        raise IncompatibleError(
            f"method {fitted.method!r} classifies with a {type(fitted.model.head).__name__} (a "
            "support-set cache, not a linear layer); only linear heads export to a library format"
        )


def merged_copy(model: ImageClassifier) -> ImageClassifier:
    """A deep copy of ``model`` in eval mode with every LoRA update folded into its weights."""
    out = copy.deepcopy(model).eval()
    merge_and_unload_lora(out)
    return out


def library_model(enc: nn.Module) -> nn.Module:
    """The library's own whole model behind an encoder (CLIP-like: both towers), as the user
    loads it and hands it to PEFT; else the image encoder itself."""
    lib = getattr(enc, "_library", None)
    return lib[0] if lib else enc.image_encoder


def merged_for(fitted: Fitted, family: str, fmt: str) -> ImageClassifier:
    """A merged copy of the fitted classifier, whose backbone must come from ``family``."""
    model = merged_copy(fitted.model)
    enc = model.encoder
    if enc.family != family:
        raise IncompatibleError(
            f"--format {fmt} needs a model of the {family} family; {enc.name!r} is {enc.family}"
        )
    return model


def head_tensors(model: ImageClassifier) -> dict[str, torch.Tensor]:
    """The linear head as ``weight``/``bias`` tensors (contiguous, on the CPU)."""
    head = model.head
    out = {"weight": head.weight.detach().cpu().contiguous()}
    if head.bias is not None:
        out["bias"] = head.bias.detach().cpu().contiguous()
    return out


def normalizes(model: ImageClassifier) -> bool:
    """Whether the head acts on L2-normalised features (CLIP zero-shot style cosine head)."""
    return bool(model.normalize_features)


def metadata(fitted: Fitted, fmt: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Class names, head, preprocessing and provenance of an export (JSON-able)."""
    from clinadapt import __version__

    model = fitted.model
    enc = model.encoder
    return {
        "format": fmt,
        "clinadapt_version": __version__,
        "class_names": list(fitted.class_names),
        "preprocessing": enc.preprocess.to_dict(),
        "head": {
            "kind": "linear",
            "in_features": int(model.head.in_features),
            "num_classes": int(model.head.out_features),
            "normalize_features": normalizes(model),
        },
        "base_model": {"name": enc.name, "family": enc.family, "source": enc.source},
        "target": fitted.target.to_dict(),
        "method": fitted.method,
        "adapted_from": fitted.origin,
        **(extra or {}),
    }


#: how each pooling turns the library model's output into the head's input, as code the user
#: runs on the reloaded model (``model``) and a preprocessed batch (``x``; transformers 5)
FEATURES = {
    "cls": "model(pixel_values=x).pooler_output",
    "mean_patch": "model(pixel_values=x, noise=torch.arange(N).expand(len(x), N).to(x))"
    ".last_hidden_state[:, 1:].mean(dim=1)  # N patches: no masking, patches in order",
    "spatial_mean": "model(pixel_values=x).last_hidden_state.mean(dim=(-2, -1))",
    "mean": "model(pixel_values=x).last_hidden_state.mean(dim=1)",
    "image_embeds": "model.get_image_features(pixel_values=x).pooler_output",
    "encode_image": "model.encode_image(x)",
}


def pooling_of(enc: nn.Module) -> str:
    """How the library model's output becomes the head's input (a key of ``FEATURES``)."""
    if enc.family == "open_clip":
        return "encode_image"
    return getattr(enc, "pooling", "image_embeds")  # transformers CLIP: get_image_features


def features_code(pooling: str, normalize: bool) -> str:
    """The expression that gives the head's input (L2-normalised where the head needs it)."""
    code = FEATURES[pooling]
    return f"torch.nn.functional.normalize({code}, dim=-1)" if normalize else code


def write_json(path: Path, data: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def save_head(path: Path, model: ImageClassifier, class_names: list[str]) -> Path:
    """The head as safetensors with class names and the normalisation flag in its metadata."""
    from safetensors.torch import save_file

    meta = {
        "class_names": json.dumps(list(class_names)),
        "normalize_features": json.dumps(normalizes(model)),
    }
    with atomic_path(path) as tmp:
        save_file(head_tensors(model), str(tmp), metadata=meta)
    return path
