"""The shift registry, the split every protocol returns, and the helpers protocols share."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinadapt.data.base import SEGMENTATION, ClinicalDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts.registry import SHIFTS
from clinadapt.validate import did_you_mean


@dataclass
class ShiftSplit:
    """A labelled source (train/val) and named test sets; ``in_domain`` names the held-out source ones."""

    protocol: str
    train: ClinicalDataset
    val: ClinicalDataset | None
    tests: dict[str, ClinicalDataset]
    in_domain: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    # what the protocol decided for the user (a validation set held out of train, ...)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """Sizes and options, for the result record."""
        return {
            "protocol": self.protocol,
            "options": self.options,
            "train": len(self.train),
            "val": len(self.val) if self.val is not None else 0,
            "tests": {k: len(v) for k, v in self.tests.items()},
            "in_domain": list(self.in_domain),
            **({"notes": notes} if (notes := [*self.train.notes, *self.notes]) else {}),
        }


#: Golden-ratio step: a low-discrepancy sequence spreads each label's patients over the splits.
_PHI = (5**0.5 - 1) / 2


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) sizes of ``n`` patients; from 3 patients on, each split gets one."""
    if n < 3:
        return (n, 0, 0) if n < 2 else (1, 0, 1)
    n_va = max(1, round(fractions[1] * n))
    n_te = max(1, round(fractions[2] * n))
    return n - n_va - n_te, n_va, n_te


def ensure_splits(
    ds: ClinicalDataset, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> ClinicalDataset:
    """Give a dataset without ``split`` metadata a seeded train/val/test split, and say so.

    Patients (images, without patient ids) are split within each domain (site), so every site
    of three or more patients has test patients, and stratified by label: patients ordered by
    label take their splits from a low-discrepancy sequence, so each label is spread over the
    splits in the proportions ``fractions``. The dataset's ``notes`` record the split.
    """
    if ds.has_meta("split"):
        return ds
    groups = ds.meta("patient_id") if ds.has_meta("patient_id") else np.arange(len(ds)).astype(str)
    domains = ds.meta("domain") if ds.has_meta("domain") else np.full(len(ds), "")
    labels = ds.labels.reshape(len(ds), -1)
    first: dict[str, int] = {}
    for i, g in enumerate(groups.tolist()):
        first.setdefault(g, i)
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for domain in sorted(set(domains.tolist())):
        members = [g for g, i in first.items() if domains[i] == domain]
        # a patient's label: that of its first image (patients rarely mix labels); then random
        keys = [labels[first[g]].tobytes() for g in members]
        tie = rng.permutation(len(members))
        order = sorted(range(len(members)), key=lambda j: (keys[j], tie[j]))
        n_tr, n_va, _ = split_counts(len(members), fractions)
        spread = (rng.random() + np.arange(len(members)) * _PHI) % 1.0
        for rank, pos in enumerate(np.argsort(spread, kind="stable")):
            g = members[order[pos]]
            split_of[g] = "train" if rank < n_tr else ("val" if rank < n_tr + n_va else "test")
    meta = dict(ds.metadata)
    meta["split"] = np.asarray([split_of[g] for g in groups.tolist()])
    unit = "patients" if ds.has_meta("patient_id") else "images"
    within = " within each domain" if ds.has_meta("domain") else ""
    pct = "/".join(f"{round(100 * f)}" for f in fractions)
    note = (
        f"no split in the data: {unit} split {pct}% into train/val/test{within}, "
        f"stratified by label, seed {seed}"
    )
    return ds.replace(metadata=meta, notes=[*ds.notes, note])


def val_or_none(ds: ClinicalDataset, **where: Any) -> ClinicalDataset | None:
    try:
        return ds.where(**where)
    except DataError:
        return None


def apply_shift(ds: ClinicalDataset, protocol: str, seed: int = 0, **options: Any) -> ShiftSplit:
    """Split ``ds`` by a registered protocol."""
    fn = SHIFTS.get(protocol)
    known = [n for n in list(inspect.signature(fn).parameters)[1:] if n != "seed"]
    for key in options:
        if key not in known:
            raise ConfigError(
                f"shift {protocol!r}: unknown option {key!r}{did_you_mean(key, known)} "
                f"(known: {', '.join(known) or 'none'})"
            )
    split = fn(ds, seed=seed, **options)
    if split.val is None and ds.task != SEGMENTATION:
        split = hold_out_validation(split, seed)
    return split


def hold_out_validation(
    split: ShiftSplit, seed: int, fraction: float = 0.2, min_patients: int = 5
) -> ShiftSplit:
    """A split without validation data gets one: ``fraction`` of the training patients, held
    out by label as :func:`ensure_splits` does, and a note in the record. Model selection, the
    operating point and TTA preparation then use it instead of silently using nothing.

    Fewer than ``min_patients`` training patients are left whole, and the note says there is no
    validation data.
    """
    train = split.train
    groups = train.meta("patient_id") if train.has_meta("patient_id") else None
    unit = "patients" if groups is not None else "images"
    ids = groups if groups is not None else np.arange(len(train)).astype(str)
    n = len(np.unique(ids))
    if n < min_patients:
        note = (
            f"no validation data and only {n} training {unit}: nothing selected on validation "
            "(last epoch, operating point at 0.5)"
        )
        return dataclasses.replace(split, notes=[*split.notes, note])
    parts = ensure_splits(
        train.replace(metadata={k: v for k, v in train.metadata.items() if k != "split"}),
        (1.0 - fraction, fraction, 0.0),
        seed,
    )
    val_rows = np.flatnonzero(parts.meta("split") == "val")
    keep = np.setdiff1d(np.arange(len(train)), val_rows)
    note = (
        f"no validation data: {len(np.unique(ids[val_rows]))} of {n} training {unit} "
        f"({round(100 * fraction)}%, stratified by label, seed {seed}) held out as validation"
    )
    return dataclasses.replace(
        split,
        train=train.subset(keep),
        val=train.subset(val_rows, name=f"{train.name} (held-out validation)"),
        notes=[*split.notes, note],
    )


__all__ = ["SHIFTS", "ShiftSplit", "apply_shift", "ensure_splits", "split_counts", "val_or_none"]
