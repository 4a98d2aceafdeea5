"""open_clip CLIP models: projected image/text embeddings, the learned logit scale, its tokenizer.

Models are always built as ``CustomTextCLIP`` so the text tower is one module (``model.text``)
that LoRA, adapters and prompt learners can target; ``open_clip.load_checkpoint`` converts
OpenAI-layout checkpoints to it. Everything is resolved to local files before open_clip sees it,
so open_clip never reaches for the hub on its own.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from clinadapt.errors import IncompatibleError, RegistryError, WeightsUnavailableError
from clinadapt.models._common import (
    MissingTokenizer,
    TokenizerFn,
    as_list,
    deep_merge,
    module_device,
    pair,
    seeded,
)
from clinadapt.models._weights import (
    ResolvedWeights,
    WeightsRequest,
    hf_cache_dir,
    is_online,
    model_dir,
    resolve_weights,
)
from clinadapt.models.base import FoundationModel, Preprocessing
from clinadapt.models.spec import ModelSpec

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
HUB_INCLUDE = '--include "*.json" --include "*.txt" --include "*.safetensors" --include "*.bin"'


class OpenClipModel(FoundationModel):
    """An open_clip model: ``image_encoder`` is ``model.visual``, ``text_encoder`` is ``model.text``."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings, as open_clip's ``encode_image``."""
        return self.image_encoder(images)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected (unnormalised) text embeddings of a list of strings."""
        tokens = self.tokenizer(as_list(texts)).to(module_device(self.text_encoder))
        return self.text_encoder(tokens)

    @property
    def library_model(self) -> torch.nn.Module:
        """The whole open_clip model (not registered as a submodule, to avoid duplicate params)."""
        return self._library[0]

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        """The text tower's token-embedding table (prompt learners replace its output)."""
        text = self.text_encoder
        table = getattr(text, "token_embedding", None)
        if isinstance(table, torch.nn.Embedding):
            return table
        return text.transformer.get_input_embeddings()  # HFTextEncoder, e.g. PubMedBERT


def raw_spec(rest: str) -> ModelSpec:
    """A spec for ``open_clip:<arch>[@<tag | file | hf-hub:repo>]``, ``open_clip:hf-hub:<repo>``
    or ``open_clip:local-dir:<dir>``."""
    import open_clip

    if rest.startswith(HF_HUB):
        arch, tag = rest, rest
    elif rest.startswith(LOCAL_DIR) or Path(rest).expanduser().is_dir():
        path = rest.removeprefix(LOCAL_DIR)
        arch, tag = LOCAL_DIR + path, path
    else:
        arch, _, tag = rest.partition("@")
        if arch not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown open_clip architecture {arch!r}.{hint} See open_clip.list_models()."
            )
    return ModelSpec(
        f"open_clip:{rest}", "open_clip", arch, tag or None, f"open_clip {rest}", text=True
    )


def _tag_request(spec: ModelSpec, arch: str, tag: str) -> tuple[WeightsRequest, dict[str, Any]]:
    """The weights request of a built-in architecture's pretrained tag, and the tag's config."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise RegistryError(
            f"open_clip architecture {arch!r} has no pretrained tag {tag!r} and no file of that "
            f"name exists. Tags: {', '.join(tags) or 'none'}"
        )
    hub = cfg.get("hf_hub") or ""
    if hub:
        # "org/repo/file.bin", or "org/repo/" for the default open_clip file names
        repo, filename = os.path.split(hub)
        if filename:
            stem, ext = os.path.splitext(filename)
            files = (f"{stem}.safetensors", filename) if ext in (".bin", ".pth") else (filename,)
        else:
            files = WEIGHT_FILES
        request = WeightsRequest(
            spec.name,
            spec.dir_name,
            repo,
            (files,),
            download_args=" ".join(f'--include "{f}"' for f in files),
        )
    else:
        request = WeightsRequest(
            spec.name, spec.dir_name, None, (WEIGHT_FILES,), url=cfg.get("url")
        )
    return request, cfg


def _file_request(spec: ModelSpec) -> WeightsRequest:
    return WeightsRequest(spec.name, spec.dir_name, None, (WEIGHT_FILES,))


def _repo_request(spec: ModelSpec, repo: str | None, *, with_config: bool) -> WeightsRequest:
    files = ((CONFIG_FILE,), WEIGHT_FILES) if with_config else ((CONFIG_FILE,),)
    return WeightsRequest(
        spec.name,
        spec.dir_name,
        repo,
        files,
        optional=TOKENIZER_FILES if with_config else (),
        download_args=HUB_INCLUDE,
    )


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    return dict(data.get("model_cfg", data)), dict(data.get("preprocess_cfg", {}))


def _infer_bert_config(checkpoint: Path) -> Any:
    """Rebuild a BERT text tower's config from the checkpoint's tensor shapes (offline fallback)."""
    from open_clip.factory import load_state_dict
    from transformers import BertConfig

    sd = load_state_dict(str(checkpoint))
    p = "text.transformer."
    words = sd.get(p + "embeddings.word_embeddings.weight")
    if words is None or p + "encoder.layer.0.intermediate.dense.weight" not in sd:
        return None
    hidden = int(words.shape[1])
    layers = {
        int(k[len(p + "encoder.layer.") :].split(".")[0])
        for k in sd
        if k.startswith(p + "encoder.layer.")
    }
    types = sd.get(p + "embeddings.token_type_embeddings.weight")
    return BertConfig(
        vocab_size=int(words.shape[0]),
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),  # BERT convention: 64-dim heads
        intermediate_size=int(sd[p + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(sd[p + "embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(types.shape[0]) if types is not None else 2,
    )


def _hf_text_config_dir(name: str, checkpoint: Path | None, tmp: str, model: str) -> str:
    """A local folder holding the config.json of a transformers text tower."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", cache_dir=hf_cache_dir())
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if is_online():
        try:
            from huggingface_hub import hf_hub_download

            return str(Path(hf_hub_download(name, "config.json", cache_dir=hf_cache_dir())).parent)
        except Exception:
            pass  # fall back to the checkpoint's shapes below
    config = _infer_bert_config(checkpoint) if checkpoint is not None else None
    if config is None and checkpoint is None and "bert" in name.lower():
        from transformers import BertConfig

        config = BertConfig()  # random init of a BERT-base text tower needs only its shape
    if config is None:
        raise WeightsUnavailableError(
            f"the text tower of {model!r} is the transformers model {name!r}, whose config.json "
            f"is neither cached nor reachable. On a machine with network run `hf download {name} "
            f"config.json` and copy the Hugging Face cache ({hf_cache_dir()}) here."
        )
    config.save_pretrained(tmp)
    return tmp


def _has_tokenizer_files(d: Path) -> bool:
    return (
        (d / "tokenizer.json").is_file()
        or (d / "vocab.txt").is_file()
        or (d / "vocab.json").is_file()
    )


def _hf_tokenizer(
    name: str, directory: Path | None, text_cfg: Mapping[str, Any], spec: ModelSpec
) -> TokenizerFn:
    from open_clip.tokenizer import HFTokenizer

    source: str | None = None
    if directory is not None and _has_tokenizer_files(directory):
        source = str(directory)
    elif Path(name).expanduser().is_dir():
        source = str(Path(name).expanduser())
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "tokenizer_config.json", cache_dir=hf_cache_dir())
        if isinstance(cached, str) and _has_tokenizer_files(Path(cached).parent):
            source = str(Path(cached).parent)
        elif is_online():
            source = name
    if source is None:
        target = model_dir(spec.dir_name)
        return MissingTokenizer(
            f"the tokenizer of {spec.name!r} ({name}) is not available offline. On a machine with "
            f'network run `hf download {name} --include "*.json" --include "*.txt" --local-dir '
            f"{target}` and copy that folder here (or into the folder given as weights=)."
        )
    return HFTokenizer(
        source,
        context_length=int(text_cfg.get("context_length", 77)),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        cache_dir=str(hf_cache_dir()),
        **dict(text_cfg.get("tokenizer_kwargs", {})),
    )


@lru_cache(maxsize=8)
def simple_tokenizer(context_length: int) -> TokenizerFn:
    """open_clip's OpenAI CLIP BPE tokenizer (its vocabulary ships inside the package)."""
    from open_clip import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def _preprocess(
    model: torch.nn.Module, spec: ModelSpec, pp_cfg: Mapping[str, Any]
) -> Preprocessing:
    """Read preprocessing from open_clip's config and record it on the model as open_clip does."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pp = merge_preprocess_dict(asdict(PreprocessCfg()), dict(pp_cfg))
    pp["size"] = getattr(model.visual, "image_size", None) or pp["size"]
    set_model_preprocess_cfg(model, pp)
    if spec.preprocess is not None:
        return spec.preprocess
    return Preprocessing(
        image_size=pair(pp["size"]),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
        in_chans=3,
        interpolation=str(pp.get("interpolation", "bicubic")),
    )


def build(
    spec: ModelSpec,
    *,
    weights: str | os.PathLike[str] | None,
    pretrained: bool,
    overrides: Mapping[str, Any],
) -> OpenClipModel:
    """Build ``spec`` as an open_clip ``CustomTextCLIP`` and load its checkpoint, if any."""
    import open_clip

    arch, tag = spec.arch, spec.pretrained
    use_weights = weights is not None or (pretrained and tag is not None)
    resolved: ResolvedWeights | None = None
    pp_cfg: dict[str, Any] = {}
    quick_gelu = False

    if arch.startswith((HF_HUB, LOCAL_DIR)):
        # config (and weights) live in a hub repo or a local folder
        repo = arch[len(HF_HUB) :] if arch.startswith(HF_HUB) else None
        if arch.startswith(LOCAL_DIR) and weights is None:
            weights = arch[len(LOCAL_DIR) :]
            use_weights = use_weights or pretrained
        if use_weights:
            resolved = resolve_weights(_repo_request(spec, repo, with_config=True), weights)
            model_cfg, pp_cfg = _read_config(resolved.files[0])
        elif "model_cfg" in spec.kwargs:
            model_cfg, pp_cfg = (
                dict(spec.kwargs["model_cfg"]),
                dict(spec.kwargs.get("preprocess_cfg", {})),
            )
        else:
            conf = resolve_weights(_repo_request(spec, repo, with_config=False), weights)
            model_cfg, pp_cfg = _read_config(conf.files[0])
    else:
        model_cfg = spec.kwargs.get("model_cfg") or open_clip.get_model_config(arch)
        if model_cfg is None:
            raise RegistryError(
                f"unknown open_clip architecture {arch!r}; see open_clip.list_models()"
            )
        model_cfg = dict(model_cfg)
        pp_cfg = dict(spec.kwargs.get("preprocess_cfg", {}))
        request = _file_request(spec)
        if tag is not None and tag.startswith(HF_HUB):
            request = WeightsRequest(
                spec.name,
                spec.dir_name,
                tag[len(HF_HUB) :],
                (WEIGHT_FILES,),
                download_args=HUB_INCLUDE,
            )
        elif tag is not None and Path(tag).expanduser().is_file():
            weights = tag if weights is None else weights
        elif tag is not None and not spec.tiny:
            request, tag_cfg = _tag_request(spec, arch, tag)
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            pp_cfg = {
                k: tag_cfg[k]
                for k in ("mean", "std", "interpolation", "resize_mode")
                if k in tag_cfg
            }
        if use_weights:
            resolved = resolve_weights(request, weights)

    checkpoint = None
    if resolved is not None:
        checkpoint = resolved.files[-1]  # the weights file is the last required group
    model_cfg = deep_merge(model_cfg, overrides)
    if quick_gelu:
        model_cfg["quick_gelu"] = True  # OpenAI weights were trained with QuickGELU
    model_cfg.pop("custom_text", None)
    if "multimodal_cfg" in model_cfg:
        raise IncompatibleError(
            f"{spec.name!r} is a CoCa captioning model; only CLIP-style models are supported"
        )
    vision_cfg = model_cfg.setdefault("vision_cfg", {})
    text_cfg = model_cfg.setdefault("text_cfg", {})
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # the full checkpoint (or random init) wins
    hf_text = text_cfg.get("hf_model_name")
    built_cfg = copy.deepcopy(model_cfg)  # what open_clip needs to build it again (exports)
    with tempfile.TemporaryDirectory() as tmp:
        if hf_text:
            text_cfg["hf_model_name"] = _hf_text_config_dir(hf_text, checkpoint, tmp, spec.name)
            text_cfg["hf_model_pretrained"] = False
        with seeded(spec.seed):
            model = open_clip.CustomTextCLIP(**model_cfg)
    if checkpoint is not None:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True)

    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = _hf_tokenizer(
            text_cfg["hf_tokenizer_name"], resolved.directory if resolved else None, text_cfg, spec
        )
    else:
        tokenizer = simple_tokenizer(int(text_cfg.get("context_length", 77)))
    preprocess = _preprocess(model, spec, pp_cfg)
    fm = OpenClipModel(
        spec.name,
        "open_clip",
        model.visual,
        int(model_cfg["embed_dim"]),
        preprocess,
        text_encoder=model.text,
        tokenizer=tokenizer,
        logit_scale=float(model.logit_scale.detach().exp().reshape(-1)[0]),
        source=resolved.source if resolved is not None else "random init",
    )
    fm._library = (model,)
    from open_clip.model import get_model_preprocess_cfg

    fm.library_config = {"model_cfg": built_cfg, "preprocess_cfg": get_model_preprocess_cfg(model)}
    return fm
