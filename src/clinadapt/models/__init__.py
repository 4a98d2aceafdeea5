"""Registry of backbones and ``load_model``: one common face over timm, open_clip and transformers.

Names a user types are registered in :data:`MODELS`; any library id also works as
``timm:<name>``, ``hf:<repo id or local dir>`` or ``open_clip:<arch>[@<tag | file | hf-hub:repo>]``.
3D backbones (family ``volume``: ResEnc, STU-Net, Primus, SwinUNETR) take volumes; any 2D model
runs on volumes slice by slice as ``slices:<name>``.
``tiny-*`` models are small randomly initialised configurations of each family (tests, demo).
Specs are data: one JSON file per family beside its loader (``timm_family.json``, ...).
Libraries (and torch) are imported only when a model of their family is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinadapt._lazy import lazy_exports
from clinadapt.errors import ConfigError, RegistryError, WeightsUnavailableError
from clinadapt.models._weights import is_online, loading_weights, model_dir_root
from clinadapt.models.preprocessing import Preprocessing
from clinadapt.models.registry import MODELS, register
from clinadapt.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch

    from clinadapt.models.base import FoundationModel

__getattr__ = lazy_exports(__name__, {"FoundationModel": "clinadapt.models.base"})

#: the library-id prefixes ``load_model`` understands besides registered names
PREFIXES = ("timm:", "hf:", "open_clip:", "slices:")


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered name or of a ``timm:``/``hf:``/``open_clip:`` id."""
    if name in MODELS:
        return MODELS.get(name)
    prefix, sep, rest = name.partition(":")
    if sep and rest:
        if prefix == "timm":
            from clinadapt.models.timm_family import raw_spec
        elif prefix == "hf":
            from clinadapt.models.hf_family import raw_spec
        elif prefix == "open_clip":
            from clinadapt.models.open_clip_family import raw_spec
        else:
            raw_spec = None
        if raw_spec is not None:
            return raw_spec(rest)
    try:
        return MODELS.get(name)
    except RegistryError as e:
        raise RegistryError(
            f"{e} Any library id works too: timm:<name>, hf:<repo or dir>, open_clip:<arch>[@<tag>]."
        ) from None


def _builder(family: str) -> Callable[..., FoundationModel]:
    if family == "timm":
        from clinadapt.models.timm_family import build
    elif family == "open_clip":
        from clinadapt.models.open_clip_family import build
    elif family == "volume":
        from clinadapt.models.volume.build import build
    else:
        from clinadapt.models.hf_family import build
    return build


def load_model(
    name: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    **options: Any,
) -> FoundationModel:
    """Build a backbone by registered name or library id, in eval mode on ``device``.

    Weights come from ``weights`` (a file or folder), else ``$CLINADAPT_MODEL_DIR/<name>/``, else
    the Hugging Face cache, else the hub when online; otherwise ``WeightsUnavailableError`` says
    what to download and where to put it. ``pretrained=False`` builds a random initialisation
    without looking for weights. ``options`` are checked against the family's builder (see
    :mod:`clinadapt.models.options`): ``image_size`` for any model, else timm constructor
    arguments (``in_chans``, ``drop_path_rate``, ...), open_clip model config keys or
    transformers config fields; the model's ``describe()`` records them.
    """
    from clinadapt.models._common import adjust_preprocess
    from clinadapt.models.options import IMAGE_SIZE, builder_options, check_image_size

    if name.startswith("slices:"):  # a 2D model on volumes, slice by slice
        from clinadapt.models.volume.slices import load_slicewise

        return load_slicewise(
            name, weights=weights, pretrained=pretrained, device=device, **options
        )
    spec = get_spec(name)
    kwargs = builder_options(spec, options)
    if weights is not None and not pretrained:
        raise ConfigError(
            f"weights={weights!s} was given with pretrained=False for {name!r}; drop one"
        )
    if weights is not None:
        weights = os.fspath(weights)
    with loading_weights(weights, f"weights of {name!r}"):
        model = _builder(spec.family)(
            spec, weights=weights, pretrained=pretrained, overrides=kwargs
        )
    if IMAGE_SIZE in options:  # also for architectures without an input size of their own
        model.preprocess = adjust_preprocess(
            model.preprocess, image_size=check_image_size(options[IMAGE_SIZE])
        )
    model.options = dict(options)
    return model.to(device).eval()


__all__ = [
    "MODELS",
    "PREFIXES",
    "FoundationModel",
    "ModelSpec",
    "Preprocessing",
    "WeightsUnavailableError",
    "get_spec",
    "is_online",
    "list_models",
    "load_model",
    "model_dir_root",
    "register",
]
