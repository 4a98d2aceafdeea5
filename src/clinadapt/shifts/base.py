"""The shift registry, the split every protocol returns, and the helpers protocols share."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinadapt._registry import Registry
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError, DataError, brief

SHIFTS: Registry = Registry("shift")


@dataclass
class ShiftSplit:
    """A labelled source (train/val) and named test sets; ``in_domain`` names the held-out source ones."""

    protocol: str
    train: ClinicalDataset
    val: ClinicalDataset | None
    tests: dict[str, ClinicalDataset]
    in_domain: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Sizes and options, for the result record."""
        return {
            "protocol": self.protocol,
            "options": self.options,
            "train": len(self.train),
            "val": len(self.val) if self.val is not None else 0,
            "tests": {k: len(v) for k, v in self.tests.items()},
            "in_domain": list(self.in_domain),
        }


def ensure_splits(
    ds: ClinicalDataset, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> ClinicalDataset:
    """Give a dataset without ``split`` metadata a seeded train/val/test split (per patient if known)."""
    if ds.has_meta("split"):
        return ds
    groups = ds.meta("patient_id") if ds.has_meta("patient_id") else np.arange(len(ds)).astype(str)
    uniq = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_tr = round(fractions[0] * len(uniq))
    n_va = round(fractions[1] * len(uniq))
    split_of = {}
    for rank, g in enumerate(uniq[order]):
        split_of[g] = "train" if rank < n_tr else ("val" if rank < n_tr + n_va else "test")
    meta = dict(ds.metadata)
    meta["split"] = np.asarray([split_of[g] for g in groups])
    return ds.replace(metadata=meta)


def val_or_none(ds: ClinicalDataset, **where: Any) -> ClinicalDataset | None:
    try:
        return ds.where(**where)
    except DataError:
        return None


def apply_shift(ds: ClinicalDataset, protocol: str, seed: int = 0, **options: Any) -> ShiftSplit:
    """Split ``ds`` by a registered protocol."""
    fn = SHIFTS.get(protocol)
    try:
        inspect.signature(fn).bind(ds, seed=seed, **options)
    except TypeError as e:
        raise ConfigError(f"shift {protocol!r}: bad options {brief(options)}: {e}") from e
    return fn(ds, seed=seed, **options)


__all__ = ["SHIFTS", "ShiftSplit", "apply_shift", "ensure_splits", "val_or_none"]
