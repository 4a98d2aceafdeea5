"""``--format timm``: timm's own folder (``config.json`` + ``model.safetensors``), LoRA merged.

Written by timm's ``save_for_hf``, so ``timm.create_model("local-dir:<folder>",
pretrained=True)`` rebuilds it with the classifier, the class names (``pretrained_cfg
["label_names"]``) and the preprocessing (``timm.data.resolve_model_data_config``). The same
``model.safetensors`` also loads as ``timm.create_model(arch, pretrained=True, num_classes=K,
pretrained_cfg_overlay={"file": ..., "num_classes": K}, **model_args)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clinadapt.errors import IncompatibleError
from clinadapt.export.common import METADATA_FILE, merged_for, metadata, normalizes, write_json
from clinadapt.fitted import Fitted


def timm_data_config(pp) -> dict:
    """timm's data config for clinadapt's preprocessing (no crop: the whole image is resized)."""
    h, w = pp.image_size
    return {
        "input_size": (pp.in_chans, h, w),
        "mean": tuple(pp.mean),
        "std": tuple(pp.std),
        "interpolation": pp.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def export_timm(fitted: Fitted, out: Path) -> dict:
    """Write the adapted timm model with its classifier; return the export's metadata."""
    from timm.models._hub import save_for_hf

    model = merged_for(fitted, "timm", "timm")
    enc = model.encoder
    if normalizes(model):
        raise IncompatibleError(
            "this head classifies L2-normalised features (a cosine head), which a timm classifier "
            "cannot express; export the model with --format open_clip or transformers instead"
        )
    net = enc.image_encoder
    k = model.head.out_features
    net.reset_classifier(k)
    classifier = net.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(model.head.weight)
        if classifier.bias is not None and model.head.bias is not None:
            classifier.bias.copy_(model.head.bias)
    config = getattr(enc, "library_config", {}) or {}
    args = dict(config.get("model_args", {}))
    save_for_hf(
        net,
        str(out),
        model_config={"label_names": list(fitted.class_names)},
        model_args=args,
        safe_serialization=True,
        data_config=timm_data_config(enc.preprocess),
    )
    meta = metadata(
        fitted,
        "timm",
        {
            "architecture": net.pretrained_cfg.get("architecture"),
            "model_args": args,
            "load": f'timm.create_model("local-dir:{out}", pretrained=True)',
        },
    )
    write_json(out / METADATA_FILE, meta)
    return meta
