"""Registry of backbones and ``load_model``: one common face over timm, open_clip and transformers.

Names a user types are registered in :data:`MODELS`; any library id also works as
``timm:<name>``, ``hf:<repo id or local dir>`` or ``open_clip:<arch>[@<tag | file | hf-hub:repo>]``.
``tiny-*`` models are small randomly initialised configurations of each family (tests, demo).
Libraries are imported only when a model of their family is loaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clinadapt._registry import Registry
from clinadapt.errors import (
    ClinadaptError,
    ConfigError,
    IncompatibleError,
    RegistryError,
    WeightsUnavailableError,
)
from clinadapt.models._common import adjust_preprocess
from clinadapt.models._weights import is_online, load_failure, model_dir_root
from clinadapt.models.base import FoundationModel, Preprocessing
from clinadapt.models.options import IMAGE_SIZE, builder_options, check_image_size
from clinadapt.models.spec import ModelSpec

MODELS: Registry[ModelSpec] = Registry("model")
PREFIXES = ("timm:", "hf:", "open_clip:")

_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _tiny_pp(
    size: int, mean: tuple[float, ...] = _HALF, std: tuple[float, ...] = _HALF
) -> Preprocessing:
    return Preprocessing(image_size=(size, size), mean=mean, std=std, in_chans=3)


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to :data:`MODELS` (tags: family, ``tiny``, ``text``)."""
    tags = (spec.family,) + (("tiny",) if spec.tiny else ()) + (("text",) if spec.text else ())
    MODELS.register(spec.name, spec, help=spec.description, tags=tags)
    return spec


# --- published foundation models -------------------------------------------------------------

_BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

for _spec in (
    ModelSpec(
        "clip-vit-b16",
        "open_clip",
        "ViT-B-16",
        "openai",
        "OpenAI CLIP ViT-B/16 (open_clip), image+text, 512-d",
        text=True,
    ),
    ModelSpec(
        "biomedclip",
        "open_clip",
        _BIOMEDCLIP,
        _BIOMEDCLIP,
        "BiomedCLIP ViT-B/16 + PubMedBERT (open_clip), biomedical image+text, 512-d",
        text=True,
        # the architecture, for pretrained=False without the hub config
        kwargs={
            "model_cfg": {
                "embed_dim": 512,
                "vision_cfg": {
                    "timm_model_name": "vit_base_patch16_224",
                    "timm_model_pretrained": False,
                    "timm_pool": "",
                    "timm_proj": "linear",
                    "image_size": 224,
                },
                "text_cfg": {
                    "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                    "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                    "hf_proj_type": "mlp",
                    "hf_pooler_type": "cls_last_hidden_state_pooler",
                    "context_length": 256,
                },
            },
            "preprocess_cfg": {"mean": list(_OPENAI_MEAN), "std": list(_OPENAI_STD)},
        },
    ),
    ModelSpec(
        "dinov2-vits14",
        "timm",
        "vit_small_patch14_dinov2.lvd142m",
        "timm/vit_small_patch14_dinov2.lvd142m",
        "DINOv2 ViT-S/14 self-supervised (timm), run at 224x224, 384-d",
        kwargs={"img_size": 224},  # timm's default 518 is slow on CPU; pos-embed is resampled
    ),
    ModelSpec(
        "dino-vits16",
        "timm",
        "vit_small_patch16_224.dino",
        "timm/vit_small_patch16_224.dino",
        "DINO ViT-S/16 self-supervised (timm), 384-d",
    ),
    ModelSpec(
        "mae-vit-b16",
        "timm",
        "vit_base_patch16_224.mae",
        "timm/vit_base_patch16_224.mae",
        "MAE ViT-B/16 self-supervised (timm), 768-d",
    ),
    ModelSpec(
        "resnet50",
        "timm",
        "resnet50.a1_in1k",
        "timm/resnet50.a1_in1k",
        "ResNet-50 ImageNet-1k supervised (timm a1 recipe), 2048-d",
    ),
    ModelSpec(
        "swin-t",
        "timm",
        "swin_tiny_patch4_window7_224.ms_in1k",
        "timm/swin_tiny_patch4_window7_224.ms_in1k",
        "Swin-T ImageNet-1k supervised (timm), 768-d",
    ),
    ModelSpec(
        "vit-b16",
        "timm",
        "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "ViT-B/16 ImageNet-21k -> 1k supervised (timm augreg2), 768-d",
    ),
    ModelSpec(
        "hf-clip-vit-b16",
        "hf",
        "clip",
        "openai/clip-vit-base-patch16",
        "OpenAI CLIP ViT-B/16 (transformers), image+text, 512-d",
        text=True,
        kwargs={"config": {"vision_config": {"patch_size": 16}, "projection_dim": 512}},
    ),
    ModelSpec(
        "hf-dinov2-vits14",
        "hf",
        "dinov2",
        "facebook/dinov2-small",
        "DINOv2 ViT-S/14 (transformers), CLS token, 384-d",
        kwargs={"config": {"hidden_size": 384, "num_attention_heads": 6, "image_size": 518}},
    ),
    ModelSpec(
        "hf-mae-vit-b16",
        "hf",
        "vit_mae",
        "facebook/vit-mae-base",
        "MAE ViT-B/16 (transformers), mean of patch tokens without masking, 768-d",
        kwargs={"config": {"mask_ratio": 0.0}},
    ),
    ModelSpec(
        "sam-vit-b",
        "hf",
        "sam",
        "facebook/sam-vit-base",
        "SAM ViT-B image encoder (transformers), 1024x1024, pooled 256-d",
        kwargs={"config": {}},
    ),
    ModelSpec(
        "medsam",
        "hf",
        "sam",
        "wanglab/medsam-vit-base",
        "MedSAM: SAM ViT-B fine-tuned on medical images, image encoder, pooled 256-d",
        kwargs={"config": {}},
    ),
):
    register(_spec)

# --- tiny random configurations of every family (tests, the CPU demo) --------------------------

for _spec in (
    ModelSpec(
        "tiny-resnet",
        "timm",
        "resnet18",
        None,
        "tiny timm ResNet (3x3 deep stem 8-8-16, BasicBlock 1-1-1-1, 16-128 channels), 64x64, "
        "128-d, random init",
        tiny=True,
        # timm uses stem_width only for deep stems: its 7x7 stem is always 64 channels wide.
        kwargs={
            "layers": (1, 1, 1, 1),
            "channels": (16, 32, 64, 128),
            "stem_type": "deep",
            "stem_width": 8,
        },
        preprocess=_tiny_pp(64),
    ),
    ModelSpec(
        "tiny-vit",
        "timm",
        "vit_small_patch16_224",
        None,
        "tiny timm ViT (patch 8, dim 64, depth 2, 2 heads), 32x32, 64-d, random init",
        tiny=True,
        kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
        preprocess=_tiny_pp(32),
        seed=1,
    ),
    ModelSpec(
        "tiny-swin",
        "timm",
        "swin_tiny_patch4_window7_224",
        None,
        "tiny timm Swin (patch 4, window 4, dims 32-64, depths 1-1), 64x64, 64-d, random init",
        tiny=True,
        kwargs={
            "img_size": 64,
            "patch_size": 4,
            "window_size": 4,
            "embed_dim": 32,
            "depths": (1, 1),
            "num_heads": (2, 4),
        },
        preprocess=_tiny_pp(64),
        seed=2,
    ),
    ModelSpec(
        "tiny-dino",
        "timm",
        "vit_small_patch16_224",
        None,
        "tiny timm ViT, DINO-style (CLS token, ImageNet stats), 32x32, 64-d, random init",
        tiny=True,
        kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4},
        preprocess=_tiny_pp(32, _IMAGENET_MEAN, _IMAGENET_STD),
        seed=3,
    ),
    ModelSpec(
        "tiny-clip",
        "open_clip",
        "tiny-clip",
        None,
        "tiny open_clip CLIP (ViT patch 8 width 32, text width 32, 2+2 layers), 32x32, 32-d",
        tiny=True,
        text=True,
        kwargs={
            "model_cfg": {
                "embed_dim": 32,
                "vision_cfg": {
                    "image_size": 32,
                    "patch_size": 8,
                    "width": 32,
                    "layers": 2,
                    "head_width": 16,
                    "mlp_ratio": 2.0,
                },
                "text_cfg": {
                    "context_length": 32,
                    "vocab_size": 49408,
                    "width": 32,
                    "heads": 2,
                    "layers": 2,
                    "mlp_ratio": 2.0,
                },
            },
        },
        preprocess=_tiny_pp(32, _OPENAI_MEAN, _OPENAI_STD),
        seed=4,
    ),
    ModelSpec(
        "tiny-hf-clip",
        "hf",
        "clip",
        None,
        "tiny transformers CLIPModel (patch 8, hidden 32, 2+2 layers), 32x32, 32-d",
        tiny=True,
        text=True,
        kwargs={
            "config": {
                "projection_dim": 32,
                "vision_config": {
                    "image_size": 32,
                    "patch_size": 8,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                },
                "text_config": {
                    "vocab_size": 49408,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "max_position_embeddings": 32,
                    "bos_token_id": 49406,
                    "eos_token_id": 49407,
                    "pad_token_id": 0,
                },
            },
        },
        preprocess=_tiny_pp(32, _OPENAI_MEAN, _OPENAI_STD),
        seed=5,
    ),
    ModelSpec(
        "tiny-dinov2",
        "hf",
        "dinov2",
        None,
        "tiny transformers Dinov2Model (patch 8, hidden 32, 2 layers), 32x32, 32-d, random init",
        tiny=True,
        kwargs={
            "config": {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_ratio": 2,
            }
        },
        preprocess=_tiny_pp(32),
        seed=6,
    ),
    ModelSpec(
        "tiny-mae",
        "hf",
        "vit_mae",
        None,
        "tiny transformers ViTMAEModel (patch 8, hidden 32, 2 layers, no masking), 32x32, 32-d",
        tiny=True,
        kwargs={
            "config": {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "decoder_hidden_size": 32,
                "decoder_num_hidden_layers": 1,
                "decoder_num_attention_heads": 2,
                "decoder_intermediate_size": 64,
                "mask_ratio": 0.0,
            }
        },
        preprocess=_tiny_pp(32),
        seed=7,
    ),
    ModelSpec(
        "tiny-sam",
        "hf",
        "sam",
        None,
        "tiny transformers SAM image encoder (patch 8, hidden 32, window 4), 64x64, 32-d",
        tiny=True,
        kwargs={
            "config": {
                "image_size": 64,
                "patch_size": 8,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_dim": 64,
                "window_size": 4,
                "global_attn_indexes": [1],
                "output_channels": 32,
                "num_pos_feats": 16,
                # SamVisionConfig's default of 1e-10 suits loading weights, not random features
                "initializer_range": 0.02,
            }
        },
        preprocess=_tiny_pp(64),
        seed=8,
    ),
):
    register(_spec)


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
    spec = get_spec(name)
    kwargs = builder_options(spec, options)
    if weights is not None and not pretrained:
        raise ConfigError(
            f"weights={weights!s} was given with pretrained=False for {name!r}; drop one"
        )
    if weights is not None:
        weights = os.fspath(weights)
    try:
        with warnings.catch_warnings():  # torch notes pickle protocols of files it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = _builder(spec.family)(
                spec, weights=weights, pretrained=pretrained, overrides=kwargs
            )
    except ClinadaptError:
        raise
    except Exception as e:  # a file that is not (these) weights: one line naming it
        if weights is None:
            raise
        raise IncompatibleError(load_failure(weights, name, e)) from e
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
