"""``--format open_clip``: open_clip's local folder (``open_clip_config.json`` +
``open_clip_model.safetensors``, both towers, LoRA merged) and the head beside it.

``open_clip.create_model("local-dir:<folder>")`` rebuilds the model (with its preprocessing
config); the head (``clinadapt_head.safetensors``: weight, bias, class names, and whether it
acts on L2-normalised image embeddings, as a zero-shot head does) maps
``model.encode_image(x)`` to logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from clinadapt.errors import IncompatibleError
from clinadapt.export.common import (
    HEAD_FILE,
    METADATA_FILE,
    features_code,
    merged_for,
    metadata,
    normalizes,
    pooling_of,
    save_head,
    write_json,
)
from clinadapt.fitted import Fitted
from clinadapt.store import atomic_path

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def export_open_clip(fitted: Fitted, out: Path) -> dict:
    """Write the adapted open_clip model, its config and the head; return the metadata."""
    from safetensors.torch import save_file

    model = merged_for(fitted, "open_clip", "open_clip")
    enc = model.encoder
    config = copy.deepcopy(getattr(enc, "library_config", None) or {})
    if "model_cfg" not in config:
        raise IncompatibleError(f"{enc.name!r} was built without its open_clip config")
    config["model_cfg"]["custom_text"] = True  # the text tower is model.text, as built here
    pp = enc.preprocess  # what the adapted model was trained and evaluated with
    config["preprocess_cfg"] = {
        **config.get("preprocess_cfg", {}),
        "size": list(pp.image_size),
        "mean": list(pp.mean),
        "std": list(pp.std),
        "interpolation": pp.interpolation,
        "resize_mode": "squash",  # clinadapt resizes the whole image, no crop
    }
    state = {k: v.detach().cpu().contiguous() for k, v in enc.library_model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=str) + "\n")
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    save_head(out / HEAD_FILE, model, fitted.class_names)
    extra = {
        "load": f'open_clip.create_model("local-dir:{out}")',
        "features": features_code(pooling_of(enc), normalizes(model)),
    }
    meta = metadata(fitted, "open_clip", extra)
    write_json(out / METADATA_FILE, meta)
    return meta
