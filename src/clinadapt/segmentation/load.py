"""``load_segmenter``: a registered segmenter (specs.py) built with its weights.

Weights are found as for the backbone registry (models/_weights.py): ``weights=`` (a transformers folder, or one checkpoint file in
segment-anything or transformers key format), else ``$CLINADAPT_MODEL_DIR/<name>/`` (either
kind), else the Hugging Face cache, else the hub when online; otherwise the error says what to
download and where. ``$CLINADAPT_MODEL_DIR/<name>`` is the same folder the backbone registry's
entry of that name uses, so one download of ``sam-vit-b`` or ``medsam`` serves both tasks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from clinadapt.errors import (
    ConfigError,
    IncompatibleError,
    WeightsUnavailableError,
)
from clinadapt.models._common import deep_merge, quiet_transformers, seeded
from clinadapt.models._weights import (
    WEIGHT_SUFFIXES,
    WeightsRequest,
    loading_weights,
    model_dir,
    resolve_weights,
)
from clinadapt.segmentation.base import Segmenter
from clinadapt.segmentation.checkpoint import (
    is_segment_anything_state,
    load_segment_anything,
    read_state,
)
from clinadapt.segmentation.preprocess import RULES
from clinadapt.segmentation.sam import Sam2Segmenter, SamSegmenter, build_sam
from clinadapt.segmentation.specs import SEGMENTERS, SegmenterSpec

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_INCLUDE = '--include "*.json" --include "*.safetensors"'


def _wrap(spec: SegmenterSpec, sam: torch.nn.Module, source: str) -> Segmenter:
    rule = RULES[spec.rule](int(sam.config.prompt_encoder_config.image_size))
    cls = Sam2Segmenter if spec.family == "sam2" else SamSegmenter
    return cls(spec.name, sam.eval(), rule, source)


def _weights_file(d: Path) -> Path | None:
    """The one checkpoint file of a folder without config.json (segment-anything style)."""
    files = [f for f in sorted(d.iterdir()) if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    return files[0] if len(files) == 1 else None


def _from_file(spec: SegmenterSpec, path: Path) -> torch.nn.Module:
    """A segment-anything or transformers-keyed checkpoint file on the spec's architecture."""
    with seeded(spec.seed):
        sam = build_sam(spec.family, spec.config)
    state = read_state(path)
    if is_segment_anything_state(state):
        if spec.family != "sam":
            raise IncompatibleError(
                f"{path} is a segment-anything (SAM 1) checkpoint; {spec.name!r} is SAM 2"
            )
        load_segment_anything(sam, path, spec.name)
        return sam
    own = sam.state_dict()
    if set(state) != set(own):
        missing = sorted(set(own) - set(state))[:3]
        extra = sorted(set(state) - set(own))[:3]
        raise IncompatibleError(
            f"{path}: its tensors do not fit segmenter {spec.name!r} (missing {missing}, "
            f"unexpected {extra}); adapted weights from clinadapt load with --weights on "
            "`clinadapt segment` or load_adapted()"
        )
    sam.load_state_dict(state, strict=True)
    return sam


def _from_folder(spec: SegmenterSpec, directory: Path) -> torch.nn.Module:
    import transformers

    cls = transformers.Sam2Model if spec.family == "sam2" else transformers.SamModel
    with quiet_transformers():
        sam, info = cls.from_pretrained(
            str(directory), dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise IncompatibleError(
            f"{directory} does not hold a full {spec.family.upper()} model for {spec.name!r}: "
            f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    return sam


def _request(spec: SegmenterSpec) -> WeightsRequest:
    return WeightsRequest(
        spec.name,
        spec.name,
        spec.repo,
        (("config.json",), HF_WEIGHT_FILES),
        download_args=HUB_INCLUDE,
        any_weights_file=False,
    )


def _alternative(spec: SegmenterSpec) -> str:
    target = model_dir(spec.name)
    if spec.url:
        name = spec.url.rsplit("/", 1)[-1]
        return (
            f"Or the original segment-anything checkpoint: mkdir -p {target} && curl -L -o "
            f"{target}/{name} {spec.url}"
        )
    if spec.checkpoint:
        return (
            f"Or the original checkpoint {spec.checkpoint} from {spec.checkpoint_from}, put in "
            f"{target}/ or passed as weights=PATH (--weights PATH)."
        )
    return ""


def _resolve(
    spec: SegmenterSpec, weights: str | os.PathLike[str] | None
) -> tuple[torch.nn.Module, str]:
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file():
            return _from_file(spec, p), f"file: {p}"
        if p.is_dir():
            if (p / "config.json").is_file():
                return _from_folder(spec, p), f"local dir: {p}"
            f = _weights_file(p)
            if f is not None:
                return _from_file(spec, f), f"file: {f}"
            raise WeightsUnavailableError(
                f"weights directory {p} for {spec.name!r} holds neither config.json + "
                "model.safetensors (transformers) nor exactly one checkpoint file"
            )
        raise WeightsUnavailableError(f"weights={p} for {spec.name!r} does not exist")
    mdir = model_dir(spec.name)
    if mdir.is_dir() and not (mdir / "config.json").is_file():
        f = _weights_file(mdir)
        if f is not None:
            return _from_file(spec, f), f"model dir: {f}"
    try:
        resolved = resolve_weights(_request(spec))
    except WeightsUnavailableError as e:
        extra = _alternative(spec)
        raise WeightsUnavailableError(f"{e}\n{extra}" if extra else str(e)) from None
    return _from_folder(spec, resolved.files[0].parent), resolved.source


def load_segmenter(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
) -> Segmenter:
    """Build a registered promptable segmenter in eval mode on ``device``.

    ``pretrained=False`` (always, for the ``tiny-*`` ones) builds a seeded random initialisation;
    ``config`` overrides architecture keys for that (nested transformers config keys).
    """
    spec = SEGMENTERS.get(name)
    if weights is not None and not pretrained:
        raise ConfigError(
            f"weights={weights!s} was given with pretrained=False for {name!r}; drop one"
        )
    if config:
        spec = SegmenterSpec(**{**spec.__dict__, "config": deep_merge(spec.config, config)})
    if spec.tiny and weights is None:
        pretrained = False
    if pretrained or weights is not None:
        with loading_weights(weights, f"weights of {name!r}"):
            sam, source = _resolve(spec, weights)
    else:
        with seeded(spec.seed):
            sam = build_sam(spec.family, spec.config)
        source = "random init"
    return _wrap(spec, sam, source).to(device).eval()
