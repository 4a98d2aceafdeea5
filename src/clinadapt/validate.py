"""Typed options and configs from plain mappings, with one-line errors that say what to type."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from clinadapt.errors import ConfigError, brief

M = TypeVar("M", bound=BaseModel)


def field_names(cls: type[BaseModel]) -> list[str]:
    """The names a user may type for ``cls``'s fields (aliases where a field has one)."""
    return [f.alias or name for name, f in cls.model_fields.items()]


def did_you_mean(key: str, known: list[str]) -> str:
    """`` did you mean 'x'?`` for the closest names to ``key``, or an empty string."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (None past a plain dict)."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def explain(
    e: ValidationError,
    cls: type[BaseModel],
    hint: Callable[[str], str | None] | None = None,
) -> str:
    """One line per problem of ``e``, joined by "; ": unknown keys with suggestions, bad values
    with the (shortened) input. ``hint(key)`` may suggest where an unknown top-level key goes."""
    parts: list[str] = []
    for err in e.errors():
        loc = tuple(err.get("loc", ()))
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err.get("type") == "extra_forbidden":
            holder = _model_at(cls, loc)
            known = field_names(holder) if holder is not None else []
            suggestion = hint(where) if hint is not None and len(loc) == 1 else None
            text = f"unknown option {where!r}"
            text += (
                f"; did you mean {suggestion!r}?"
                if suggestion
                else did_you_mean(str(loc[-1]), known)
            )
            if known:
                text += f" (known: {', '.join(known)})"
            parts.append(text)
        elif not loc:  # a check of the whole configuration (a model validator)
            parts.append(str(err.get("msg", "")).removeprefix("Value error, "))
        elif err.get("type") == "missing":
            parts.append(f"option {where!r} is required")
        else:
            parts.append(f"option {where!r}: {err.get('msg')} (got {brief(err.get('input'))})")
    return "; ".join(parts)


def parse_model(
    cls: type[M],
    data: Mapping[str, Any] | None,
    what: str,
    hint: Callable[[str], str | None] | None = None,
) -> M:
    """Validate ``data`` as ``cls``; a bad key or value is one ConfigError that starts with
    ``what`` (e.g. ``"method 'tent'"``) and suggests the closest known option."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(
            f"{what}: options must be a mapping of names to values, got {brief(data)}"
        )
    try:
        return cls(**dict(data or {}))
    except ValidationError as e:
        raise ConfigError(f"{what}: {explain(e, cls, hint)}") from None


def describe_options(cls: type[BaseModel]) -> list[dict[str, Any]]:
    """Each option of ``cls``: name, type, default and description (for help listings)."""
    out = []
    for name, f in cls.model_fields.items():
        annotation = f.annotation
        type_name = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
        type_text = type_name or str(annotation).replace("typing.", "")
        if f.is_required():
            default: Any = "(required)"
        elif f.default_factory is not None:
            default = f.default_factory()
        else:
            default = f.default
        if isinstance(default, BaseModel):
            default = default.model_dump()
        out.append(
            {
                "name": f.alias or name,
                "type": type_text,
                "default": default,
                "description": f.description or "",
            }
        )
    return out
