"""The model registry: specs declared as data, one JSON file per family beside its loader."""

from __future__ import annotations

import json
from pathlib import Path

from clinadapt._registry import Registry
from clinadapt.errors import RegistryError
from clinadapt.models.spec import FAMILIES, ModelSpec

MODELS: Registry[ModelSpec] = Registry("model")


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to :data:`MODELS` (tags: family, ``tiny``, ``text``)."""
    tags = (spec.family,) + (("tiny",) if spec.tiny else ()) + (("text",) if spec.text else ())
    MODELS.register(spec.name, spec, help=spec.description, tags=tags)
    return spec


def read_specs(path: str | Path, family: str) -> list[ModelSpec]:
    """The model specs declared in one family's JSON file (a list of objects)."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
        return [ModelSpec.from_dict(item, family) for item in items]
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise RegistryError(f"cannot read the model specs in {path}: {e}") from e


for _family in FAMILIES:
    for _spec in read_specs(Path(__file__).with_name(f"{_family}_family.json"), _family):
        register(_spec)
