"""Build a 3D backbone from its spec and load published weights from local files (offline rules).

A volume spec's ``arch`` is ``resenc``, ``stunet``, ``primus`` or ``swinunetr``; its ``kwargs`` are
the architecture's settings plus the input (``volume_size``, ``intensity``). ``pretrained`` is
``None`` (no published weights: tiny models), ``"url:<address>"`` (a direct download) or
``"local:<file>|<file>"`` (the authors publish the checkpoint where it cannot be fetched by a
script: it must be put in ``$CLINADAPT_MODEL_DIR/<name>/`` or passed as ``weights=``).
Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)``; the usual
containers (``network_weights`` of nnU-Net v2, ``state_dict`` of nnU-Net v1 and MONAI,
``model``) are unwrapped, then the architecture maps the authors' names onto its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.models._common import seeded
from clinadapt.models._weights import WeightsRequest, resolve_weights
from clinadapt.models.spec import ModelSpec
from clinadapt.models.volume.base import MappedCheckpoint, VolumeArch, VolumeModel, strip_prefix
from clinadapt.models.volume.preprocess import VolumePreprocessing

INPUT_KEYS = ("volume_size", "intensity")
_CONTAINERS = ("network_weights", "state_dict", "model", "teacher", "student")
_WRAPPERS = ("module.", "_orig_mod.", "network.")


def _config_class(arch: str) -> type:
    if arch == "resenc":
        from clinadapt.models.volume.resenc import ResEncConfig

        return ResEncConfig
    if arch == "stunet":
        from clinadapt.models.volume.stunet import STUNetConfig

        return STUNetConfig
    if arch == "primus":
        from clinadapt.models.volume.primus import PrimusConfig

        return PrimusConfig
    if arch == "swinunetr":
        from clinadapt.models.volume.swinunetr import SwinConfig

        return SwinConfig
    raise ConfigError(f"unknown volume architecture {arch!r}")


def option_names(spec: ModelSpec) -> set[str]:
    """The model options a volume spec accepts: its architecture's settings and the input."""
    fields = {f.name for f in dataclasses.fields(_config_class(spec.arch))}
    if spec.arch == "primus":
        fields.discard("input_size")  # follows volume_size
    return fields | set(INPUT_KEYS)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def make_arch(
    spec: ModelSpec, overrides: Mapping[str, Any]
) -> tuple[VolumeArch, VolumePreprocessing]:
    """The architecture and preprocessing of ``spec`` with option ``overrides``."""
    kwargs = {**spec.kwargs, **overrides}
    size = kwargs.pop("volume_size", 32)
    size = (int(size),) * 3 if isinstance(size, int) else tuple(int(v) for v in size)
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"model {spec.name!r}: volume_size must be an int or 3 ints, got {size}")
    intensity = kwargs.pop("intensity", "zscore")
    if intensity not in ("zscore", "unit"):
        raise ConfigError(
            f"model {spec.name!r}: intensity must be zscore or unit, got {intensity!r}"
        )
    cls = _config_class(spec.arch)
    if spec.arch == "primus":
        kwargs["input_size"] = size
    try:
        cfg = cls(**{k: _tuple(v) for k, v in kwargs.items()})
    except TypeError as e:
        raise ConfigError(f"model {spec.name!r}: {e}") from e
    with seeded(spec.seed):
        arch = _arch_of(spec.arch, cfg)
    if any(s % arch.divisor for s in size):
        raise ConfigError(
            f"model {spec.name!r}: volume_size {size} must be a multiple of {arch.divisor} "
            "(the encoder's total stride)"
        )
    return arch, VolumePreprocessing(size, cfg.in_chans, intensity)


def _arch_of(arch: str, cfg: Any) -> VolumeArch:
    if arch == "resenc":
        from clinadapt.models.volume.resenc import ResEnc

        return ResEnc(cfg)
    if arch == "stunet":
        from clinadapt.models.volume.stunet import STUNet

        return STUNet(cfg)
    if arch == "primus":
        from clinadapt.models.volume.primus import Primus

        return Primus(cfg)
    from clinadapt.models.volume.swinunetr import SwinUNETRArch

    return SwinUNETRArch(cfg)


def weights_request(spec: ModelSpec) -> WeightsRequest:
    """Where the published weights of ``spec`` are: a download address or local files only."""
    source = spec.pretrained or ""
    if source.startswith("url:"):
        url = source[len("url:") :]
        return WeightsRequest(
            spec.name, spec.dir_name, None, ((Path(url).name, "model.safetensors"),), url=url
        )
    files = tuple(source[len("local:") :].split("|")) if source.startswith("local:") else ()
    return WeightsRequest(spec.name, spec.dir_name, None, (files or ("model.safetensors",),))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from the usual trainer containers."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p)))
    state: Any = torch.load(str(p), map_location="cpu", weights_only=True)
    for _ in range(2):
        if isinstance(state, Mapping):
            inner = next((state[k] for k in _CONTAINERS if isinstance(state.get(k), Mapping)), None)
            if inner is not None and not all(isinstance(v, torch.Tensor) for v in state.values()):
                state = inner
    if not isinstance(state, Mapping) or not state:
        raise IncompatibleError(f"{p}: holds no state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights(model: VolumeModel, path: str | os.PathLike[str]) -> MappedCheckpoint:
    """Load a checkpoint into ``model``: every encoder tensor must be there; the decoder's are
    kept for :meth:`VolumeModel.make_decoder`."""
    state = read_checkpoint(path)
    own = model.image_encoder.state_dict()
    if set(state) == set(own):  # this package's own layout: the encoder as pretrain writes it
        mapped = MappedCheckpoint(dict(state))
    else:
        mapped = model.arch.map_checkpoint(state)
    if not mapped.encoder:
        mapped = model.arch.map_checkpoint(strip_prefix(state, _WRAPPERS))
    missing = sorted(set(own) - set(mapped.encoder))
    unknown = sorted(set(mapped.encoder) - set(own))
    if missing or unknown:
        raise IncompatibleError(
            f"{path}: does not fit {model.name!r}: {len(missing)} encoder tensor(s) missing "
            f"(e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]}); is it a "
            f"checkpoint of this architecture and size ({model.arch.config()})?"
        )
    bad = [k for k, v in mapped.encoder.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise IncompatibleError(
            f"{path}: {len(bad)} tensor(s) have other shapes than {model.name!r}'s, e.g. {k} "
            f"{tuple(mapped.encoder[k].shape)} vs {tuple(own[k].shape)}"
        )
    model.image_encoder.load_state_dict(mapped.encoder, strict=True)
    model.pretrained_decoder = dict(mapped.decoder)
    return mapped


def build(
    spec: ModelSpec,
    *,
    weights: str | os.PathLike[str] | None,
    pretrained: bool,
    overrides: Mapping[str, Any],
) -> VolumeModel:
    """Create ``spec``'s 3D backbone; load its published (or given) weights when asked."""
    arch, pp = make_arch(spec, overrides)
    model = VolumeModel(spec.name, arch, pp)
    use_weights = weights is not None or (pretrained and spec.pretrained is not None)
    if use_weights:
        resolved = resolve_weights(weights_request(spec), weights)
        mapped = load_weights(model, resolved.file)
        model.source = resolved.source
        model.checkpoint = {
            "encoder_tensors": len(mapped.encoder),
            "decoder_tensors": len(mapped.decoder),
            "ignored": len(mapped.ignored),
        }
    model.library_config = {"arch": spec.arch, "kwargs": {**spec.kwargs, **overrides}}
    return model
