"""What to adapt: a target opens (or injects) the parameters a method may update."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from clinadapt.errors import ConfigError, IncompatibleError, brief
from clinadapt.targets.registry import TARGETS
from clinadapt.validate import parse_model


class TargetOptions(BaseModel):
    """Base of a target's typed options: unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class TargetInfo:
    """Which target was applied, with which options, and how many parameters it left trainable."""

    spec: str
    trainable: int
    total: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}


class Target(abc.ABC):
    """Base class: ``apply`` marks (or adds) trainable parameters on an already frozen model.

    A target with typed options sets ``Options`` (a :class:`TargetOptions` subclass); its
    validated fields arrive in ``apply`` as keyword arguments.
    """

    name: ClassVar[str] = "target"
    Options: ClassVar[type[TargetOptions] | None] = None

    @abc.abstractmethod
    def apply(self, model: nn.Module, **options: Any) -> None:
        """Open or inject the parameters this target adapts on ``model`` (already frozen)."""

    def parse_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """Validate ``options`` against ``Options``; the error names the target and the field."""
        options = dict(options or {})
        if self.Options is None:
            return options
        return parse_model(self.Options, options, f"target {self.name!r}").model_dump()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def split_options(parts: list[str], spec: str, options: dict[str, Any]) -> dict[str, dict]:
    """Each part's own options: flat for one part, keyed by part name for a combination."""
    if len(parts) == 1:
        part = parts[0]
        if set(options) == {part} and isinstance(options[part], dict):
            return {part: dict(options[part])}
        return {part: dict(options)}
    unknown = [k for k in options if k not in parts]
    if unknown:
        raise ConfigError(
            f"target {spec!r} combines {parts}; its options must be keyed by part name, e.g. "
            f"{{'{parts[0]}': {{...}}}}; got keys {unknown}"
        )
    for k, v in options.items():
        if not isinstance(v, dict):
            raise ConfigError(
                f"target {spec!r}: options of part {k!r} must be a mapping, got {v!r}"
            )
    return {p: dict(options.get(p) or {}) for p in parts}


def check_target(
    spec: str, options: dict[str, dict[str, Any]] | dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each part of ``spec`` with its validated options (no model needed: a run checks its
    target before any work)."""
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise ConfigError(f"empty target spec {spec!r}")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"target spec {spec!r} names a part twice")
    targets = {part: TARGETS.get(part)() for part in parts}
    raw = split_options(parts, spec, dict(options or {}))
    return {part: targets[part].parse_options(raw[part]) for part in parts}


def apply_target(
    model: nn.Module, spec: str, options: dict[str, dict[str, Any]] | dict[str, Any] | None = None
) -> TargetInfo:
    """Freeze ``model``, then open what ``spec`` names (``"head"``, ``"lora+head"``, ...).

    ``options`` holds either one target's options, or a mapping from each part's name to its
    options for combinations (``{"lora": {"rank": 4}}``).
    """
    parsed = check_target(spec, options)
    parts = list(parsed)
    targets = {part: TARGETS.get(part)() for part in parts}
    for p in model.parameters():
        p.requires_grad_(False)
    for part in parts:
        if targets[part].Options is not None:
            targets[part].apply(model, **parsed[part])
            continue
        try:  # an untyped target reports unknown options as a TypeError
            targets[part].apply(model, **parsed[part])
        except TypeError as e:
            raise ConfigError(f"target {part!r}: bad options {brief(parsed[part])}: {e}") from e
    trainable, total = count_parameters(model)
    if trainable == 0:
        name = getattr(getattr(model, "encoder", model), "name", type(model).__name__)
        raise IncompatibleError(f"target {spec!r} leaves nothing trainable on model {name!r}")
    used = parsed[parts[0]] if len(parts) == 1 else parsed
    return TargetInfo(spec=spec, trainable=trainable, total=total, options=used)
