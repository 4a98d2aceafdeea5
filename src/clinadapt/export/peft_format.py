"""``--format peft``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
for a LoRA target, written by PEFT's own ``save_pretrained``.

``PeftModel.from_pretrained(base, folder)`` applies it to the base model the user loads with its
library (the adapter config names it in ``base_model_name_or_path`` where it is published). For
timm the classifier travels in the adapter (``modules_to_save``; create the base with
``num_classes=K``); for transformers and open_clip the head is ``clinadapt_head.safetensors``.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.export.common import (
    HEAD_FILE,
    METADATA_FILE,
    features_code,
    library_model,
    metadata,
    normalizes,
    pooling_of,
    save_head,
    target_parts,
    write_json,
)
from clinadapt.export.timm_format import timm_data_config
from clinadapt.fitted import Fitted
from clinadapt.models import get_spec
from clinadapt.models.base import FoundationModel
from clinadapt.targets.lora import lora_layers, unload_lora


def export_peft(fitted: Fitted, out: Path) -> dict:
    """Write the LoRA adapter (and, for timm, the classifier); return the export's metadata."""
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )

    parts = target_parts(fitted)
    if "lora" not in parts or set(parts) - {"lora", "head"}:
        raise IncompatibleError(
            f"--format peft holds a LoRA adapter; target {fitted.target.spec!r} is not lora or "
            "lora+head (export it merged with --format timm, open_clip or transformers)"
        )
    model = copy.deepcopy(fitted.model).eval()
    enc = model.encoder
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules()):
        raise IncompatibleError(
            f"{enc.name!r} has BatchNorm layers whose running statistics moved while training; a "
            "PEFT adapter does not carry them. Export the merged model with --format "
            f"{'timm' if enc.family == 'timm' else enc.family} instead"
        )
    root = library_model(enc)
    # the LoRA target injected into the image tower, which keeps PEFT's config; in a CLIP-like
    # library model the tower's layers sit elsewhere (open_clip's ``visual.``, transformers'
    # ``vision_model.``): each tensor is keyed by its layer's name in the whole model
    tower = enc.image_encoder
    names = [n for n, m in root.named_modules() if any(m is layer for layer in lora_layers(root))]
    in_root = {id(m): n for n, m in root.named_modules()}
    in_tower = dict(tower.named_modules())
    state = {}
    for key, value in get_peft_model_state_dict(tower).items():
        path, leaf = key.split(".lora_", 1)
        state[f"{in_root[id(in_tower[path])]}.lora_{leaf}"] = value
    options = fitted.target.options.get("lora", fitted.target.options)
    unload_lora(root)
    if hasattr(tower, "peft_config"):  # left by the injection; the PeftModel below makes its own
        del tower.peft_config
    modules_to_save = None
    if enc.family == "timm":  # the classifier is part of a timm model: it travels in the adapter
        root.reset_classifier(model.head.out_features)
        classifier = root.get_classifier()
        classifier.load_state_dict(model.head.state_dict())
        modules_to_save = [n for n, m in root.named_modules() if m is classifier]
        state.update({f"{modules_to_save[0]}.{k}": v for k, v in classifier.state_dict().items()})
    config = LoraConfig(
        r=int(options.get("rank", 8)),
        lora_alpha=float(options.get("alpha", 8.0)),
        lora_dropout=float(options.get("dropout", 0.0)),
        target_modules=names,
        modules_to_save=modules_to_save,
        base_model_name_or_path=enc.source if enc.source != "random init" else None,
    )
    peft_model = get_peft_model(root, config)
    # keys as in a saved adapter file (PEFT's own prefix), so PEFT maps them as it loads one
    result = set_peft_model_state_dict(
        peft_model, {f"base_model.model.{k}": v for k, v in state.items()}
    )
    if getattr(result, "unexpected_keys", None):
        raise IncompatibleError(f"PEFT did not take the LoRA tensors {result.unexpected_keys[:3]}")
    peft_model.save_pretrained(str(out), safe_serialization=True)
    extra = {"lora_modules": names, "base_family": enc.family}
    if enc.family == "timm":
        args = dict(enc.library_config.get("model_args", {}))
        arch = root.pretrained_cfg.get("architecture")
        create = ", ".join(
            [repr(arch), f"pretrained={enc.source != 'random init'}"]
            + [f"num_classes={model.head.out_features}"]
            + [f"{k}={v!r}" for k, v in args.items()]
        )
        extra.update(
            architecture=arch,
            model_args=args,
            timm_data_config=timm_data_config(enc.preprocess),
            load=f"PeftModel.from_pretrained(timm.create_model({create}), {str(out)!r})",
        )
    else:
        save_head(out / HEAD_FILE, model, fitted.class_names)
        pooling = pooling_of(enc)
        extra["pooling"] = pooling
        extra["features"] = features_code(pooling, normalizes(model))
        extra["load"] = (
            f"PeftModel.from_pretrained({base_model_code(enc)}, {str(out)!r}), then the "
            f"head in {HEAD_FILE} on the features (see 'features')"
        )
    meta = metadata(fitted, "peft", extra)
    write_json(out / METADATA_FILE, meta)
    return meta


def base_model_code(enc: FoundationModel) -> str:
    """Python that builds, in its own library, the open_clip or transformers model an adapter
    was trained on: from the weights the run loaded (a local folder or file) or the published
    ones; a randomly initialised base cannot be rebuilt, and the text says so."""
    spec = get_spec(enc.name)
    source = str(enc.source)
    local = next(
        (source.split(": ", 1)[1] for p in ("local dir: ", "file: ") if source.startswith(p)), None
    )
    if source == "random init" or (local is None and spec.pretrained is None):
        return (
            f"<{enc.name!r} with the random weights it was trained from: not published; export "
            f"the whole model with --format {enc.family} instead>"
        )
    if enc.family == "open_clip":
        if spec.arch.startswith("hf-hub:") and local is None:  # config and weights on the hub
            return f"open_clip.create_model({spec.arch!r})"
        return f"open_clip.create_model({spec.arch!r}, pretrained={local or spec.pretrained!r})"
    return f"transformers.AutoModel.from_pretrained({local or spec.pretrained!r})"
