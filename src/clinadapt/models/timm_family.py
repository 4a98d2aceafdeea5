"""timm backbones: pooled pre-logits features, preprocessing from timm's pretrained config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from clinadapt.errors import IncompatibleError, RegistryError
from clinadapt.models._common import adjust_preprocess, capture_logs, seeded
from clinadapt.models._weights import WeightsRequest, resolve_weights
from clinadapt.models.base import FoundationModel, Preprocessing
from clinadapt.models.pooling import channels_last_pooling
from clinadapt.models.spec import ModelSpec

DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")


class TimmModel(FoundationModel):
    """A timm model with ``num_classes=0``: ``encode_image`` is its pooled pre-logits output."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Map a preprocessed (N,C,H,W) batch to (N, feature_dim) pooled features."""
        m = self.image_encoder
        return m.forward_head(m.forward_features(images), pre_logits=True)


def raw_spec(arch: str) -> ModelSpec:
    """A spec for ``timm:<name>`` (any timm model name, with or without a pretrained tag)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(arch):
        import difflib

        base = arch.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(f"unknown timm model {arch!r}.{hint} See timm.list_models().")
    cfg = get_pretrained_cfg(arch)
    source = (cfg.hf_hub_id or cfg.url or None) if cfg is not None else None
    return ModelSpec(f"timm:{arch}", "timm", arch, source, f"timm model {arch}")


def weights_request(spec: ModelSpec) -> WeightsRequest:
    """The files timm would load for ``spec`` (hub repo and file names from its pretrained config)."""
    from timm.models import get_pretrained_cfg

    cfg = None if spec.tiny else get_pretrained_cfg(spec.arch)
    repo = (cfg.hf_hub_id or None) if cfg is not None else None
    url = (cfg.url or None) if cfg is not None and not repo else None
    if repo and "@" in repo:  # timm allows "repo@revision"
        repo = repo.split("@", 1)[0]
    files = DEFAULT_FILES
    name = cfg.hf_hub_filename if cfg is not None else None
    if name and name != "pytorch_model.bin":
        # timm prefers a safetensors twin of a .bin/.pth file when the repo has one
        stem, ext = os.path.splitext(name)
        files = (f"{stem}.safetensors", name) if ext in (".bin", ".pth") else (name,)
    return WeightsRequest(spec.name, spec.dir_name, repo, (files,), url=url)


def _preprocess(
    model: torch.nn.Module, spec: ModelSpec, kwargs: Mapping[str, Any]
) -> Preprocessing:
    if spec.preprocess is not None:
        pp = spec.preprocess
    else:
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        c, h, w = cfg["input_size"]
        pp = Preprocessing(
            image_size=(int(h), int(w)),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            in_chans=int(c),
            interpolation=str(cfg.get("interpolation", "bilinear")),
        )
    # resolve_model_data_config reports the pretrained input size, not an overridden one.
    return adjust_preprocess(pp, image_size=kwargs.get("img_size"), in_chans=kwargs.get("in_chans"))


def build(
    spec: ModelSpec,
    *,
    weights: str | os.PathLike[str] | None,
    pretrained: bool,
    overrides: Mapping[str, Any],
) -> TimmModel:
    """Create ``spec`` with timm, loading local weights through ``pretrained_cfg_overlay``."""
    import timm

    kwargs: dict[str, Any] = {**spec.kwargs, **overrides}
    kwargs.setdefault("num_classes", 0)  # features, not logits
    source = "random init"
    use_weights = weights is not None or (pretrained and spec.pretrained is not None)
    if use_weights:
        resolved = resolve_weights(weights_request(spec), weights)
        kwargs["pretrained_cfg_overlay"] = {
            **kwargs.get("pretrained_cfg_overlay", {}),
            "file": str(resolved.file),
        }
        source = resolved.source
        # timm loads non-strictly when the classifier is dropped and only logs missing keys;
        # capture that log so a checkpoint that does not fit fails loudly.
        with capture_logs("timm.models._builder") as log:
            model = timm.create_model(spec.arch, pretrained=True, **kwargs)
        missing = [m for m in log.messages if m.startswith("Missing keys")]
        if missing:
            raise IncompatibleError(
                f"weights {resolved.file} do not fit timm model {spec.arch!r}: {missing[0][:500]}"
            )
    else:
        with seeded(spec.seed):
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    channels_last_pooling(model)  # same values, faster on the CPU
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    fm = TimmModel(
        spec.name, "timm", model, int(feature_dim), _preprocess(model, spec, kwargs), source=source
    )
    # what timm needs to build this architecture again (an export's model_args)
    skip = ("num_classes", "pretrained_cfg_overlay")
    fm.library_config = {"model_args": {k: v for k, v in kwargs.items() if k not in skip}}
    return fm
