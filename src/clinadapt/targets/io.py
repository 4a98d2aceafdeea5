"""Save and load only what a target adapted, as safetensors tagged with the base model's name."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clinadapt.errors import DataError, IncompatibleError
from clinadapt.store import atomic_path
from clinadapt.targets._arch import model_name
from clinadapt.targets.base import TargetInfo, apply_target

FORMAT = "clinadapt-adapted/1"


def adapted_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and every buffer (e.g. BatchNorm statistics), by state-dict key."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    keep = trainable | buffers
    # clones: a snapshot that later training steps do not change, with shared tensors untied
    # (safetensors refuses tensors that share storage)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


def save_adapted(
    model: nn.Module,
    path: str | os.PathLike[str],
    base: str | None = None,
    target: TargetInfo | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the adapted tensors of ``model`` to ``path`` (atomically); return the path.

    The metadata records the base model's name (``base``, default: the model's own) and, when
    given, the target spec and options so :func:`load_adapted` can rebuild injected layers;
    ``metadata`` adds string entries of the caller's (e.g. a learned prompt's class names).
    """
    path = Path(path)
    meta = {**dict(metadata or {}), "format": FORMAT, "base_model": base or model_name(model)}
    if target is not None:
        meta["target"] = target.spec
        meta["target_options"] = json.dumps(target.options, sort_keys=True, default=str)
    tensors = {k: v.cpu().contiguous() for k, v in adapted_state(model).items()}
    with atomic_path(path) as tmp:  # parallel sweep workers may save the same source model
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of an adapted-weights file."""
    if not Path(path).is_file():
        raise DataError(f"adapted weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{path}: not a safetensors file: {e}") from e


def load_adapted(
    model: nn.Module, path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load adapted tensors saved by :func:`save_adapted` into ``model``; return the metadata.

    The file's base model must be ``model``'s. When the file holds injected layers (LoRA,
    adapters, prompts) that ``model`` lacks, the recorded target is applied first. Every
    tensor must find a key of the same shape, or nothing is loaded.
    """
    meta = read_metadata(path)
    base, own = meta.get("base_model"), model_name(model)
    if base is None:
        raise IncompatibleError(f"{path}: no base_model in its metadata; cannot check the base")
    if base != own:
        raise IncompatibleError(
            f"{path} was adapted from base model {base!r}; it cannot be loaded onto {own!r}"
        )
    state = load_file(str(path), device=str(device))
    current = model.state_dict()
    if any(k not in current for k in state) and "target" in meta:
        options = json.loads(meta.get("target_options") or "{}")
        apply_target(model, meta["target"], options)
        current = model.state_dict()
    missing = sorted(k for k in state if k not in current)
    if missing:
        raise IncompatibleError(
            f"{path}: {len(missing)} tensors have no place in model {own!r} "
            f"(e.g. {missing[:3]}); apply the same target before loading"
        )
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(current[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(current[k].shape)
    ]
    if wrong:
        raise IncompatibleError(f"{path}: shapes do not fit model {own!r}: {'; '.join(wrong[:3])}")
    model.load_state_dict(state, strict=False)
    return meta
