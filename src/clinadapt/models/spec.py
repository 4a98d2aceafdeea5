"""What a registered model is: its family, library identifier and where its weights live."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from clinadapt.models.preprocessing import Preprocessing

Family = Literal["timm", "open_clip", "hf", "volume"]
FAMILIES: tuple[str, ...] = ("timm", "open_clip", "hf", "volume")


@dataclass(frozen=True)
class ModelSpec:
    """A backbone recipe: which library builds it, from what, with which published weights.

    ``arch`` is the library's own identifier (a timm model name, an open_clip architecture or
    ``hf-hub:``/``local-dir:`` config source, or a transformers model type such as ``dinov2``;
    ``auto`` reads it from the checkpoint's config.json). ``pretrained`` names the published
    weights as that library spells them (timm: hub repo; open_clip: tag, file or ``hf-hub:``
    repo; transformers: hub repo or local directory); ``None`` means there are none (tiny models).
    ``kwargs`` are constructor arguments (the small sizes of tiny models, input size overrides);
    ``preprocess`` fixes the preprocessing instead of reading it from the library; ``note`` says
    why a setting is what it is.
    """

    name: str
    family: Family
    arch: str
    pretrained: str | None
    description: str
    tiny: bool = False
    text: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    preprocess: Preprocessing | None = None
    seed: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family must be one of {FAMILIES}, got {self.family!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], family: str | None = None) -> ModelSpec:
        """A spec from JSON data (``family`` given by the file it was declared in)."""
        d = dict(data)
        if family is not None:
            d.setdefault("family", family)
        if d.get("preprocess") is not None:
            d["preprocess"] = Preprocessing.from_dict(d["preprocess"])
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"model spec {d.get('name')!r}: unknown key(s) {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-able data (what ``clinadapt models NAME`` shows)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["kwargs"] = dict(self.kwargs)
        out["preprocess"] = self.preprocess.to_dict() if self.preprocess is not None else None
        return out

    @property
    def dir_name(self) -> str:
        """The folder name under ``$CLINADAPT_MODEL_DIR`` that holds this model's files."""
        return re.sub(r"[^A-Za-z0-9._-]+", "--", self.name).strip("-") or "model"
