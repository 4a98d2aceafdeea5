"""transformers backbones: CLIP, DINOv2, ViT-MAE, SAM's image encoder, or any AutoModel.

Weights are resolved to a local folder first and loaded with ``local_files_only=True``, so
transformers never reaches for the hub on its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.models._common import (
    TokenizerFn,
    as_list,
    deep_merge,
    module_device,
    pair,
    quiet_transformers,
    seeded,
)
from clinadapt.models._weights import ResolvedWeights, WeightsRequest, resolve_weights
from clinadapt.models.base import FoundationModel, Preprocessing
from clinadapt.models.spec import ModelSpec

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CLIP_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
HUB_INCLUDE = '--include "*.json" --include "*.txt" --include "*.safetensors" --include "*.bin"'
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers model_type -> how clinadapt builds and pools it
KIND_OF_TYPE = {
    "clip": "clip",
    "dinov2": "dinov2",
    "vit_mae": "vit_mae",
    "sam": "sam",
    "sam_vision_model": "sam",
}
POOLING = {"dinov2": "cls", "vit_mae": "mean_patch", "sam": "spatial_mean"}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


class HFImageModel(FoundationModel):
    """An image-only transformers model; ``pooling`` says how tokens become one vector.

    ``cls``: the pooler output (DINOv2: the layer-normed CLS token); ``mean_patch``: mean of
    the patch tokens (ViT-MAE, run with mask_ratio 0 and a fixed patch order); ``spatial_mean``:
    global average of a (N,C,H,W) embedding map (SAM); ``mean``: mean of all tokens.
    """

    def __init__(self, *args: Any, pooling: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pooling = pooling

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Map a preprocessed (N,C,H,W) batch to (N, feature_dim) pooled features."""
        m = self.image_encoder
        if self.pooling == "mean_patch":
            ph, pw = pair(m.config.patch_size)
            n = (images.shape[-2] // ph) * (images.shape[-1] // pw)
            # ascending noise keeps every patch in its own order: no masking, no randomness
            noise = torch.arange(n, device=images.device, dtype=images.dtype)
            out = m(pixel_values=images, noise=noise.expand(images.shape[0], n))
            return out.last_hidden_state[:, 1:].mean(dim=1)
        out = m(pixel_values=images)
        if self.pooling == "cls":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "spatial_mean" or hidden.ndim == 4:
            return hidden.mean(dim=(-2, -1))
        return hidden.mean(dim=1)


class HFClipVisionTower(nn.Module):
    """CLIP's vision transformer followed by its projection (as ``CLIPModel.get_image_features``)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class HFClipTextTower(nn.Module):
    """CLIP's text transformer followed by its projection (as ``CLIPModel.get_text_features``)."""

    def __init__(self, text_model: nn.Module, text_projection: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.pooler_output)


class HFClipModel(FoundationModel):
    """A transformers CLIPModel split into projected image and text towers."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings."""
        return self.image_encoder(images)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected (unnormalised) text embeddings of a list of strings."""
        ids = self.tokenizer(as_list(texts)).to(module_device(self.text_encoder))
        return self.text_encoder(ids)

    @property
    def library_model(self) -> nn.Module:
        """The whole CLIPModel (not registered as a submodule, to avoid duplicate params)."""
        return self._library[0]

    @property
    def token_embedding(self) -> nn.Embedding:
        """The text tower's token-embedding table (prompt learners replace its output)."""
        return self.text_encoder.text_model.get_input_embeddings()


class _PaddedTokenizer:
    """A transformers tokenizer padded/truncated to the text tower's positions, ids only."""

    def __init__(self, tokenizer: Any, length: int) -> None:
        self.tokenizer = tokenizer
        self.length = length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            as_list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.length,
            return_tensors="pt",
        )
        return enc["input_ids"]


def raw_spec(rest: str) -> ModelSpec:
    """A spec for ``hf:<repo id or local dir>``; the model type is read from its config.json."""
    p = Path(rest).expanduser()
    source = str(p) if p.is_dir() else rest
    return ModelSpec(f"hf:{rest}", "hf", "auto", source, f"transformers model {rest}")


def _request(
    spec: ModelSpec, kind: str, repo: str | None, *, config_only: bool = False
) -> WeightsRequest:
    files: tuple[tuple[str, ...], ...] = (
        (("config.json",),) if config_only else (("config.json",), WEIGHT_FILES)
    )
    optional = ("preprocessor_config.json",)
    if kind in ("clip", "auto") and not config_only:
        optional += CLIP_TOKENIZER_FILES
    return WeightsRequest(
        spec.name,
        spec.dir_name,
        repo,
        files,
        optional=optional,
        download_args=HUB_INCLUDE,
        any_weights_file=False,  # transformers loads only its own file names
    )


def _model_class(kind: str) -> Any:
    import transformers

    return {
        "clip": transformers.CLIPModel,
        "dinov2": transformers.Dinov2Model,
        "vit_mae": transformers.ViTMAEModel,
        "sam": transformers.SamVisionModel,
    }.get(kind, transformers.AutoModel)


def _config_from_dict(kind: str, config: Mapping[str, Any]) -> Any:
    import transformers

    cls = {
        "clip": transformers.CLIPConfig,
        "dinov2": transformers.Dinov2Config,
        "vit_mae": transformers.ViTMAEConfig,
        "sam": transformers.SamVisionConfig,
    }.get(kind)
    if cls is None:
        return transformers.AutoConfig.for_model(**dict(config))
    if kind == "sam" and "vision_config" in config:  # a full SamModel config.json
        config = config["vision_config"]
    return cls(**dict(config))


def _load_pretrained(
    kind: str, directory: Path, overrides: Mapping[str, Any], name: str
) -> tuple[Any, str]:
    kwargs = dict(overrides)
    if kind == "vit_mae":
        kwargs["mask_ratio"] = 0.0  # inference sees every patch
    with quiet_transformers():
        model, info = _model_class(kind).from_pretrained(
            str(directory),
            dtype=torch.float32,
            local_files_only=True,
            output_loading_info=True,
            **kwargs,
        )
    missing = sorted(info.get("missing_keys") or [])
    pooling = POOLING.get(kind, "pooler")
    if kind == "auto" and missing and all(k.startswith("pooler.") for k in missing):
        pooling, missing = "mean", []  # an untrained pooler would give random features
    if kind == "auto" and getattr(model, "pooler", None) is None:
        pooling = "mean"
    if missing:
        raise IncompatibleError(
            f"weights in {directory} do not fit {name!r}: missing {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    return model, pooling


def _size_of(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, list, tuple)):
        return pair(value)
    if "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    for key in ("shortest_edge", "longest_edge"):
        if key in value:
            return pair(int(value[key]))
    return None


def _preprocess(kind: str, config: Any, pp: Mapping[str, Any] | None) -> Preprocessing:
    """Preprocessing from preprocessor_config.json, else from the (vision) config."""
    vision = config.vision_config if kind == "clip" else config
    mean, std = (OPENAI_MEAN, OPENAI_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    size = pair(getattr(vision, "image_size", 224) or 224)
    interpolation = "bicubic"
    if pp:
        # the network's input is the crop (CLIP, DINOv2), the pad size (SAM) or the resize
        if pp.get("do_center_crop", True) and pp.get("crop_size"):
            size = _size_of(pp["crop_size"]) or size
        elif pp.get("do_pad") and pp.get("pad_size"):
            size = _size_of(pp["pad_size"]) or size
        elif pp.get("size"):
            size = _size_of(pp["size"]) or size
        mean = tuple(pp.get("image_mean") or mean)
        std = tuple(pp.get("image_std") or std)
        interpolation = _RESAMPLE.get(pp.get("resample"), interpolation)
    return Preprocessing(
        image_size=size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        in_chans=int(getattr(vision, "num_channels", 3) or 3),
        interpolation=interpolation,
    )


def _clip_tokenizer(directory: Path | None, length: int) -> TokenizerFn:
    from clinadapt.models.open_clip_family import simple_tokenizer

    if directory is not None and (
        (directory / "tokenizer.json").is_file()
        or ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file())
    ):
        from transformers import AutoTokenizer

        try:
            return _PaddedTokenizer(
                AutoTokenizer.from_pretrained(str(directory), local_files_only=True), length
            )
        except Exception:  # a broken tokenizer folder: the OpenAI BPE below is the same vocabulary
            pass
    # open_clip's SimpleTokenizer is the OpenAI CLIP BPE and ships with the package (works offline)
    return simple_tokenizer(length)


def _feature_dim(kind: str, model: nn.Module, preprocess: Preprocessing, pooling: str) -> int:
    cfg = model.config
    if kind == "clip":
        return int(cfg.projection_dim)
    if kind == "sam":
        return int(cfg.output_channels)
    if kind in ("dinov2", "vit_mae"):
        return int(cfg.hidden_size)
    probe = HFImageModel("probe", "hf", model, 0, preprocess, pooling=pooling)
    with torch.no_grad():
        x = torch.zeros(1, preprocess.in_chans, *preprocess.image_size)
        return int(probe.encode_image(x).shape[-1])


def build(
    spec: ModelSpec,
    *,
    weights: str | os.PathLike[str] | None,
    pretrained: bool,
    overrides: Mapping[str, Any],
) -> FoundationModel:
    """Build ``spec`` with transformers from a resolved local folder, or randomly from its config."""
    kind = spec.arch
    source = spec.pretrained
    repo = source
    if source is not None and Path(source).expanduser().is_dir():
        repo = None
        if weights is None and pretrained:
            weights = source  # hf:<local dir>
    use_weights = weights is not None or (pretrained and source is not None)
    resolved: ResolvedWeights | None = None
    pp_json: dict[str, Any] | None = None

    if use_weights:
        resolved = resolve_weights(_request(spec, kind, repo), weights)
        directory = resolved.files[0].parent
        if kind == "auto":
            model_type = json.loads(resolved.files[0].read_text()).get("model_type", "")
            kind = KIND_OF_TYPE.get(model_type, "auto")
        model, pooling = _load_pretrained(kind, directory, overrides, spec.name)
        pp_path = (
            resolved.optional.get("preprocessor_config.json")
            or directory / "preprocessor_config.json"
        )
        if pp_path.is_file():
            pp_json = json.loads(pp_path.read_text())
    else:
        directory = None
        config_dict = spec.kwargs.get("config")
        if config_dict is None:  # hf:<id> with pretrained=False still needs the architecture
            conf = resolve_weights(_request(spec, kind, repo, config_only=True), weights)
            config_dict = json.loads(conf.files[0].read_text())
            if kind == "auto":
                kind = KIND_OF_TYPE.get(config_dict.get("model_type", ""), "auto")
        config = _config_from_dict(kind, deep_merge(config_dict, overrides))
        if kind == "vit_mae":
            config.mask_ratio = 0.0
        with seeded(spec.seed):
            model = (
                _model_class(kind)(config)
                if kind != "auto"
                else _model_class(kind).from_config(config)
            )
        model.eval()
        pooling = POOLING.get(
            kind, "pooler" if getattr(model, "pooler", None) is not None else "mean"
        )

    preprocess = spec.preprocess or _preprocess(kind, model.config, pp_json)
    origin = resolved.source if resolved is not None else "random init"
    if kind == "clip":
        text_len = int(model.config.text_config.max_position_embeddings)
        fm: FoundationModel = HFClipModel(
            spec.name,
            "hf",
            HFClipVisionTower(model.vision_model, model.visual_projection),
            int(model.config.projection_dim),
            preprocess,
            text_encoder=HFClipTextTower(model.text_model, model.text_projection),
            tokenizer=_clip_tokenizer(directory, text_len),
            logit_scale=float(model.logit_scale.detach().exp()),
            source=origin,
        )
        fm._library = (model,)
        return fm
    if pooling == "pooler":
        pooling = "cls"
    return HFImageModel(
        spec.name,
        "hf",
        model,
        _feature_dim(kind, model, preprocess, pooling),
        preprocess,
        source=origin,
        pooling=pooling,
    )
