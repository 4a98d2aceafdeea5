"""Files of a pre-training run: backbone weights that ``load_model`` reads, and resumable state.

The backbone is the library model's own state dict in safetensors, with the base model name in
the file's metadata: timm and open_clip models as ``backbone.safetensors`` (one file), transformers
models as a ``backbone/`` folder with ``config.json`` and ``model.safetensors`` (what
``from_pretrained`` reads). Either path goes to ``load_model(name, weights=path)``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from clinadapt.errors import ConfigError
from clinadapt.models._weights import blocked_pickle, torch_load_tensors
from clinadapt.models.base import FoundationModel
from clinadapt.store import atomic_write_bytes, write_record

BACKBONE_FILE = "backbone.safetensors"
BACKBONE_DIR = "backbone"
HF_WEIGHTS = "model.safetensors"
STATE_FILE = "checkpoint.pt"
SUMMARY_FILE = "summary.json"
STATE_KEYS = frozenset({"step", "identity", "model", "optimizer", "scheduler", "rng"})
META_MODEL = "clinadapt_model"


def library_model(model: FoundationModel) -> nn.Module:
    """The module whose state dict the model's loader reads back as ``weights``."""
    lib = getattr(model, "_library", None)  # open_clip / transformers CLIP: the whole model
    return lib[0] if lib else model.image_encoder


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: tied or shared tensors must not share storage in a safetensors file
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def backbone_path(model: FoundationModel, out_dir: str | Path) -> Path:
    """Where :func:`save_backbone` writes ``model`` under ``out_dir`` (the ``weights`` path)."""
    return Path(out_dir) / (BACKBONE_DIR if model.family == "hf" else BACKBONE_FILE)


def save_backbone(
    model: FoundationModel,
    base_model: str,
    out_dir: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s weights under ``out_dir``; return the path to pass as ``weights``."""
    path = backbone_path(model, out_dir)
    meta = {"format": "pt", META_MODEL: base_model, "family": model.family, **(metadata or {})}
    meta = {k: str(v) for k, v in meta.items()}
    lib = library_model(model)
    data = save_safetensors(_tensors(lib), metadata=meta)
    if model.family == "hf":
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / "config.json", lib.config.to_json_string().encode())
        atomic_write_bytes(path / HF_WEIGHTS, data)
        return path
    atomic_write_bytes(path, data)
    return path


def weights_file(path: str | Path) -> Path:
    """The safetensors file inside a weights path (a file, a ``backbone/`` folder or a run dir)."""
    p = Path(path).expanduser()
    for candidate in (p, p / BACKBONE_FILE, p / HF_WEIGHTS, p / BACKBONE_DIR / HF_WEIGHTS):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no backbone weights at {p} (expected {BACKBONE_FILE} or {BACKBONE_DIR}/)")


def weights_path(path: str | Path) -> Path:
    """What to pass as ``weights``: the file, or the folder that holds a transformers model."""
    f = weights_file(path)
    return f.parent if f.name == HF_WEIGHTS else f


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata stored in a backbone's safetensors file (base model name, method, steps)."""
    f = weights_file(path)
    try:
        with safe_open(str(f), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as e:  # a truncated or foreign file under a safetensors name
        raise ConfigError(
            f"{f}: not a readable safetensors file ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from e


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a training state (model, optimiser, scheduler, step, RNG) with torch.save.

    Only tensors and plain Python values go in, so :func:`load_state` reads it back with
    ``weights_only=True``.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a training state written by :func:`save_state`.

    ``weights_only=True``: a crafted ``checkpoint.pt`` in an ``--out`` folder cannot run code
    (a pickle of anything but tensors and plain values is refused before it is unpickled).
    """
    try:
        state = torch_load_tensors(path)
    except Exception as e:  # a truncated, foreign or malicious file: say which and what to do
        why = (
            "it holds more than tensors and plain values (a pickle that could run code; "
            "refused unread)"
            if blocked_pickle(e)
            else f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        )
        raise ConfigError(
            f"cannot read the checkpoint {path}: {why}. Delete it to start over, or choose "
            "another --out."
        ) from e
    if not isinstance(state, dict) or not set(state) >= STATE_KEYS:
        raise ConfigError(
            f"{path} is not a clinadapt pre-training checkpoint (expected the keys "
            f"{sorted(STATE_KEYS)}); delete it to start over, or choose another --out."
        )
    return state


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    """Atomically write the run's JSON summary (NaN and numpy values made JSON-safe)."""
    write_record(path, summary)
