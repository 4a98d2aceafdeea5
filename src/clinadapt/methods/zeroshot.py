"""`zeroshot`: classify by similarity to text prompts of the class names; no label, no gradient.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021: the classifier's weights are the normalised text embeddings of prompts, and a prompt
ensemble averages the normalised embeddings of several templates and renormalises the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.methods.base import METHODS, Context, FitMethod, Options
from clinadapt.methods.templates import (
    TEMPLATES,
    check_templates,
    class_text,
    template_set,
    templates_for,
)
from clinadapt.models.base import FoundationModel

TEXT_BATCH = 256  # prompts per text-tower call: bounds memory for large ensembles


def require_text(model: FoundationModel, method: str) -> None:
    """Fail unless ``model`` has a text tower."""
    if not model.has_text:
        raise IncompatibleError(
            f"{method} needs a CLIP-like model with a text tower; model {model.name!r} "
            f"({model.family}) has none. Use e.g. tiny-clip, clip-vit-b16 or biomedclip."
        )


def class_prompts(
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> list[list[str]]:
    """The prompts of each class: its descriptions if given, else every template filled in."""
    templates = check_templates(templates) if templates is not None else TEMPLATES["generic"]
    descriptions = dict(descriptions or {})
    unknown = sorted(set(descriptions) - set(class_names))
    if unknown:
        raise ConfigError(
            f"descriptions name unknown class(es) {unknown}; classes: {list(class_names)}"
        )
    out = []
    for name in class_names:
        texts = [str(t) for t in descriptions.get(name, [])]
        if name in descriptions and not texts:
            raise ConfigError(f"descriptions of class {name!r} are empty")
        out.append(texts or [t.format(class_text(name)) for t in templates])
    return out


@torch.no_grad()
def encode_texts(model: FoundationModel, texts: list[str]) -> torch.Tensor:
    """Unnormalised text embeddings of ``texts``, computed in bounded chunks."""
    chunks = [
        model.encode_text(texts[i : i + TEXT_BATCH]) for i in range(0, len(texts), TEXT_BATCH)
    ]
    return torch.cat(chunks).float()


@torch.no_grad()
def zeroshot_weights(
    model: FoundationModel,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> torch.Tensor:
    """(K, D) unit-norm class embeddings: each class's prompt ensemble, averaged and renormalised.

    ``templates`` (each with one ``{}``) default to the generic medical set; a class listed in
    ``descriptions`` uses its own texts instead.
    """
    require_text(model, "zero-shot")
    if not class_names:
        raise ConfigError("zero-shot needs at least one class name")
    prompts = class_prompts(class_names, templates, descriptions)
    flat = [t for texts in prompts for t in texts]
    emb = F.normalize(encode_texts(model, flat), dim=-1)
    rows, start = [], 0
    for texts in prompts:
        rows.append(emb[start : start + len(texts)].mean(0))
        start += len(texts)
    return F.normalize(torch.stack(rows), dim=-1)


class ZeroShotOptions(Options):
    templates: list[str] | None = Field(
        None, description="prompt templates with one '{}' for the class name (default: by modality)"
    )
    modality: str | None = Field(
        None,
        description=f"template set to use instead of the dataset's modality: {sorted(TEMPLATES)}",
    )
    descriptions: dict[str, list[str]] | None = Field(
        None, description="class name -> its own prompts, used instead of the templates"
    )


def resolve_templates(options: ZeroShotOptions, modality: str) -> list[str]:
    """The templates an options object asks for: explicit, a named set, or the data's modality."""
    if options.templates is not None:
        return check_templates(options.templates)
    if options.modality is not None:
        name = template_set(options.modality)
        if name == "generic" and options.modality.lower() != "generic":
            raise ConfigError(
                f"no template set for modality {options.modality!r}; sets: {sorted(TEMPLATES)}"
            )
        return list(TEMPLATES[name])
    return list(templates_for(modality))


@METHODS.register("zeroshot")
class ZeroShot(FitMethod):
    """Set the head to the text embeddings of the class prompts; no label is read."""

    name = "zeroshot"
    reads_labels = False
    changes = "nothing trained (text-embedding head)"
    default_target = "head"
    Options = ZeroShotOptions

    def fit(
        self,
        model: ImageClassifier,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: ZeroShotOptions,
        ctx: Context,
    ) -> dict[str, Any]:
        require_text(model.encoder, "zeroshot")
        templates = resolve_templates(options, train.modality)
        weights = zeroshot_weights(
            model.encoder, train.class_names, templates, options.descriptions
        )
        model.use_cosine_head(weights.to(ctx.device), model.encoder.logit_scale)
        return {
            "templates": templates,
            "described_classes": sorted(options.descriptions or {}),
            "logit_scale": model.encoder.logit_scale,
        }
