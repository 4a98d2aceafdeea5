"""Model options (``model_options``): checked against what each family's builder takes.

``image_size`` (the input side in pixels, an int or ``[h, w]``) is clinadapt's own name and
works for every model: the preprocessing resizes images to it, and an architecture with an
input-size parameter (a timm ViT or Swin's ``img_size``, an open_clip ``vision_cfg.image_size``,
a transformers config's ``image_size``) is built for it. Every other key is the library's own
constructor argument (timm) or config field (open_clip, transformers), e.g. ``in_chans``,
``drop_path_rate``; an unknown key is a :class:`ConfigError` that lists what the family takes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from clinadapt.errors import ConfigError
from clinadapt.models.spec import ModelSpec

IMAGE_SIZE = "image_size"
# Arguments clinadapt sets itself (features, not logits; devices and dtypes by ``.to``).
_RESERVED = {"self", "num_classes", "device", "dtype", "pretrained_cfg_overlay"}


def check_image_size(value: Any) -> tuple[int, int]:
    """``28`` or ``[28, 28]`` -> ``(28, 28)``; anything else is a ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(
            f"model option image_size must be a positive int or [h, w], got {value!r}"
        )
    if isinstance(value, int):
        value = (value, value)
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(
            f"model option image_size must be a positive int or [h, w], got {value!r}"
        )
    return int(value[0]), int(value[1])


def builder_options(spec: ModelSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``spec``'s family builder for the user's ``options``.

    ``image_size`` becomes the architecture's own input-size argument where it has one and is
    dropped otherwise (a ResNet runs at any size; the preprocessing still resizes to it).
    """
    opts = dict(options)
    if spec.family == "volume":
        return _volume(spec, opts)
    size = check_image_size(opts.pop(IMAGE_SIZE)) if IMAGE_SIZE in opts else None
    if not opts and size is None:
        return {}
    if spec.family == "timm":
        return _timm(spec, opts, size)
    if spec.family == "open_clip":
        return _open_clip(spec, opts, size)
    return _hf(spec, opts, size)


def _refuse(
    spec: ModelSpec, what: str, unknown: list[str], accepted: set[str], hint: str = ""
) -> None:
    raise ConfigError(
        f"model {spec.name!r} ({what}) takes no option {', '.join(map(repr, unknown))}{hint}; "
        f"it accepts image_size (input side in pixels) and {', '.join(sorted(accepted))}"
    )


# --- timm ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def timm_parameters(arch: str) -> tuple[str, frozenset[str]]:
    """The class name and constructor arguments of timm model ``arch`` (built on no memory)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    except Exception:  # an architecture that cannot initialise on the meta device
        model = timm.create_model(arch, pretrained=False)
    params = inspect.signature(type(model).__init__).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return type(model).__name__, frozenset(names - _RESERVED)


def _timm(spec: ModelSpec, opts: dict[str, Any], size: tuple[int, int] | None) -> dict[str, Any]:
    cls, accepted = timm_parameters(spec.arch)
    unknown = sorted(set(opts) - accepted)
    if unknown:
        hint = ""
        if "img_size" in unknown:
            hint = (
                f" (a timm {cls} runs at any input size: set image_size to have the images "
                "resized to it)"
            )
        _refuse(spec, f"timm {cls}", unknown, set(accepted), hint)
    if size is not None and "img_size" in accepted:
        opts["img_size"] = size
    return opts


# --- volume (3D backbones) -------------------------------------------------------------------


def _volume(spec: ModelSpec, opts: dict[str, Any]) -> dict[str, Any]:
    from clinadapt.models.volume.build import option_names

    accepted = option_names(spec)
    unknown = sorted(set(opts) - accepted)
    if unknown:
        hint = " (a 3D backbone's input side is volume_size)" if IMAGE_SIZE in unknown else ""
        raise ConfigError(
            f"model {spec.name!r} (3D {spec.arch}) takes no option "
            f"{', '.join(map(repr, unknown))}{hint}; it accepts {', '.join(sorted(accepted))}"
        )
    return opts


# --- open_clip -------------------------------------------------------------------------------


def _open_clip(
    spec: ModelSpec, opts: dict[str, Any], size: tuple[int, int] | None
) -> dict[str, Any]:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    top = set(inspect.signature(open_clip.CustomTextCLIP.__init__).parameters) - _RESERVED
    nested = {
        "vision_cfg": {f.name for f in dataclasses.fields(CLIPVisionCfg)},
        "text_cfg": {f.name for f in dataclasses.fields(CLIPTextCfg)},
    }
    unknown = sorted(set(opts) - top)
    for key, fields in nested.items():
        value = opts.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"model {spec.name!r}: option {key} must be a mapping, got {value!r}")
        unknown += [f"{key}.{k}" for k in sorted(set(value or {}) - fields)]
    if unknown:
        _refuse(spec, "open_clip CLIP", unknown, top)
    if size is not None:
        if size[0] != size[1]:
            raise ConfigError(f"model {spec.name!r}: open_clip towers take a square image_size")
        opts["vision_cfg"] = {**opts.get("vision_cfg", {}), "image_size": size[0]}
    return opts


# --- transformers ----------------------------------------------------------------------------


def hf_config_fields(kind: str) -> dict[str, set[str]]:
    """Top-level config fields of a transformers model kind (and those of its sub-configs)."""
    from clinadapt.models.hf_family import _config_from_dict

    config = _config_from_dict(kind, {}).to_dict()
    out = {"": set(config)}
    for key, value in config.items():
        if isinstance(value, dict):
            out[key] = set(value)
    return out


def _hf(spec: ModelSpec, opts: dict[str, Any], size: tuple[int, int] | None) -> dict[str, Any]:
    kind = spec.arch
    if kind == "auto":  # the config class is known only once config.json is read
        if size is not None:
            opts["image_size"] = size[0] if size[0] == size[1] else list(size)
        return opts
    fields = hf_config_fields(kind)
    unknown = sorted(set(opts) - fields[""])
    for key, value in opts.items():
        if key in fields and key != "" and isinstance(value, Mapping):
            unknown += [f"{key}.{k}" for k in sorted(set(value) - fields[key])]
    if unknown:
        _refuse(spec, f"transformers {kind}", unknown, fields[""])
    if size is not None:
        value = size[0] if size[0] == size[1] else list(size)
        if kind == "clip":
            opts["vision_config"] = {**opts.get("vision_config", {}), "image_size": value}
        else:
            opts["image_size"] = value
    return opts
