"""``--format transformers``: a ``save_pretrained`` folder (LoRA merged) with the class names as
``id2label``, an image processor config, and the head beside it.

``AutoModel.from_pretrained(folder)`` rebuilds the backbone; ``AutoImageProcessor`` reads the
preprocessing; ``clinadapt_head.safetensors`` maps the pooled features to logits. How the
features are pooled is in ``clinadapt_export.json``: ``pooling`` names it (``cls``, the
``pooler_output``; ``mean_patch``, mean of the patch tokens, MAE; ``spatial_mean``, SAM; ``mean``,
all tokens; ``image_embeds``, CLIP's ``get_image_features``) and ``features`` is the expression
that computes the head's input from the reloaded ``model`` and a preprocessed batch ``x``.
"""

from __future__ import annotations

from pathlib import Path

from clinadapt.export.common import (
    HEAD_FILE,
    METADATA_FILE,
    features_code,
    library_model,
    merged_for,
    metadata,
    normalizes,
    pooling_of,
    save_head,
    write_json,
)
from clinadapt.fitted import Fitted

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}


def export_transformers(fitted: Fitted, out: Path) -> dict:
    """Write the adapted transformers model, its image processor and the head; return metadata."""
    from transformers import ViTImageProcessor

    model = merged_for(fitted, "hf", "transformers")
    enc = model.encoder
    net = library_model(enc)
    pooling = pooling_of(enc)
    names = list(fitted.class_names)
    net.config.id2label = dict(enumerate(names))
    net.config.label2id = {n: i for i, n in enumerate(names)}
    net.save_pretrained(str(out), safe_serialization=True)
    pp = enc.preprocess
    h, w = pp.image_size
    ViTImageProcessor(
        do_resize=True,
        size={"height": h, "width": w},
        resample=_RESAMPLE.get(pp.interpolation, 2),
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(pp.mean),
        image_std=list(pp.std),
    ).save_pretrained(str(out))
    save_head(out / HEAD_FILE, model, names)
    meta = metadata(
        fitted,
        "transformers",
        {
            "pooling": pooling,
            "features": features_code(pooling, normalizes(model)),
            "model_class": type(net).__name__,
            "load": f'transformers.AutoModel.from_pretrained("{out}")',
        },
    )
    write_json(out / METADATA_FILE, meta)
    return meta
