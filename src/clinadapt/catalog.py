"""What exists and what it takes: the data behind ``clinadapt models/methods/targets/...``.

Listings read the registries' declared entries only, so they need no torch; the details of one
entry (its typed options) import the module that defines it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import Any

#: where each listing's registry lives (all torch-free modules)
_REGISTRIES = {
    "models": ("clinadapt.models.registry", "MODELS"),
    "datasets": ("clinadapt.data.registry", "DATASETS"),
    "methods": ("clinadapt.methods.registry", "METHODS"),
    "targets": ("clinadapt.targets.registry", "TARGETS"),
    "shifts": ("clinadapt.shifts.registry", "SHIFTS"),
    "corruptions": ("clinadapt.shifts.corruptions.registry", "CORRUPTIONS"),
    "segmenters": ("clinadapt.segmentation.specs", "SEGMENTERS"),
}
KINDS = tuple(_REGISTRIES)


def _registry(kind: str) -> Any:
    if kind not in _REGISTRIES:
        raise ValueError(f"unknown catalog {kind!r}; one of {KINDS}")
    module, name = _REGISTRIES[kind]
    return getattr(importlib.import_module(module), name)


def listing(kind: str) -> list[dict[str, Any]]:
    """Every registered entry of ``kind``: name, one-line help and tags (no torch import)."""
    out = []
    for e in _registry(kind).entries():
        row: dict[str, Any] = {"name": e.name, "help": e.help, "tags": list(e.tags)}
        if kind == "methods":  # declared methods carry their kind as their first tag
            row["kind"] = e.tags[0] if e.tags else e.obj.kind
        out.append(row)
    return out


def signature_options(
    fn: Any,
    skip: int = 1,
    hide: tuple[str, ...] = (),
    descriptions: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Keyword options of a function (shift protocols, dataset loaders), after ``skip``
    positional parameters and without ``hide``: name, type, default and description (from the
    declaration's ``descriptions``, or an ``Annotated`` string)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    descriptions = descriptions or {}
    out = []
    for p in list(inspect.signature(fn).parameters.values())[skip:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in hide:
            continue
        hint = hints.get(p.name, p.annotation)
        description = ""
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            description = next(
                (getattr(x, "description", None) or "" for x in extras if x is not None), ""
            )
            description = description or next((x for x in extras if isinstance(x, str)), "")
        description = descriptions.get(p.name, description)
        type_text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        default = "(required)" if p.default is p.empty else p.default
        out.append(
            {"name": p.name, "type": type_text, "default": default, "description": description}
        )
    return out


def details(kind: str, name: str) -> dict[str, Any]:
    """One entry in full: help, tags and its options (name, type, default, description)."""
    from clinadapt.validate import describe_options

    reg = _registry(kind)
    entry = reg.entry(name)
    info: dict[str, Any] = {"name": entry.name, "help": entry.help, "tags": list(entry.tags)}
    obj = entry.obj
    if kind == "methods":
        info["kind"] = obj.kind
        info["default_target"] = obj.default_target
        info["options"] = describe_options(obj.Options)
    elif kind == "targets":
        options = getattr(obj, "Options", None)
        info["options"] = describe_options(options) if options is not None else []
    elif kind == "shifts":  # the runner passes the seed
        described = dict(entry.info.get("options", {}))
        info["options"] = signature_options(obj, hide=("seed",), descriptions=described)
    elif kind == "datasets":
        fn = getattr(obj, "func", obj)  # functools.partial of a loader
        skip = len(getattr(obj, "args", ()))
        described = dict(entry.info.get("options", {}))
        info["options"] = signature_options(fn, skip=skip, descriptions=described)
    elif kind == "models":
        info.update(obj.to_dict())
    elif kind == "segmenters":
        info.update(dataclasses.asdict(obj))
    elif kind == "corruptions":
        info.update(
            {
                "modalities": list(entry.tags),
                "severity_parameters": list(getattr(obj, "levels", ())),
            }
        )
    doc = inspect.getdoc(obj) if kind in ("methods", "targets", "shifts") else None
    if doc:
        info["doc"] = doc
    return info
