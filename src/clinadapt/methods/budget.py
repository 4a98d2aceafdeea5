"""The labelled images a fit may see: in a K-shot run, K per class and nothing more.

A K-shot result is only few-shot if no step sees more labels than the support set: not the
hyper-parameter search, not early stopping, not the operating point. ``selection`` says how a
method chooses what it would otherwise choose on validation data:

- ``support-cv``: stratified cross-validation within the support set (K >= 2), out-of-fold
  predictions pooled; only methods that can refit cheaply offer it;
- ``kshot-val``: a K-shot validation set drawn from the validation split, min(K, 4) images per
  class as CoOp does (``generate_fewshot_dataset(val, num_shots=min(num_shots, 4))`` in its
  dataset readers), patient-disjoint from the support set; the run then sees up to
  K + min(K, 4) labelled images per class, and the record says so;
- ``fixed``: no selection: the method's fixed published defaults;
- ``validation``: the whole labelled validation split, for runs on all training data only;
- ``auto`` (default): ``validation`` with all training data, else ``support-cv`` where the
  method offers it and K >= 2, else ``fixed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from clinadapt.data.base import ClinicalDataset
from clinadapt.data.fewshot import sample_few_shot
from clinadapt.errors import ConfigError
from clinadapt.methods.base import Options

Selection = Literal["auto", "support-cv", "kshot-val", "fixed", "validation"]
KSHOT_VAL_MAX = 4  # CoOp's few-shot validation set: min(K, 4) images per class


class FewShotOptions(Options):
    """Options of every method that can train on K images per class."""

    shots: int | None = Field(
        None, ge=1, description="labelled images per class (None: all training data)"
    )
    selection: Selection = Field(
        "auto",
        description="how choices are made without the validation split in K-shot runs: "
        "support-cv, kshot-val (min(K,4) per class, CoOp), fixed (published defaults), "
        "validation (all-data runs only), auto",
    )


class CrossValidatedOptions(FewShotOptions):
    """Options of a method that can select by cross-validation within the support set."""

    cv_folds: int = Field(5, ge=2, description="support-cv: at most this many folds (and K)")


@dataclass(frozen=True)
class LabelledBudget:
    """What a fit sees: its training (support) set, its validation set (or none), and why."""

    train: ClinicalDataset
    val: ClinicalDataset | None
    shots: int | None
    selection: str  # resolved: support-cv, kshot-val, fixed or validation

    def per_class(self, ds: ClinicalDataset | None) -> list[int]:
        return [] if ds is None else [int(c) for c in ds.class_counts()]

    def describe(self) -> dict[str, Any]:
        """The record's ``labelled`` block: how many labelled images of each class were seen."""
        train, val = self.per_class(self.train), self.per_class(self.val)
        seen = [a + b for a, b in zip(train, val or [0] * len(train), strict=True)]
        return {
            "shots": self.shots,
            "selection": self.selection,
            "train_images": len(self.train),
            "val_images": 0 if self.val is None else len(self.val),
            "per_class": {"train": train, "val": val},
            "max_per_class": max(seen, default=0),
        }


def _is_kshot(ds: ClinicalDataset, shots: int) -> bool:
    """Whether ``ds`` already is a ``shots``-shot set (exactly that many images per class)."""
    return ds.task != "multilabel" and bool((ds.class_counts() == shots).all())


def resolve_selection(selection: str, shots: int | None, cross_validates: bool) -> str:
    """The selection ``auto`` stands for, or a ConfigError for one that cannot apply."""
    if selection == "auto":
        if shots is None:
            return "validation"
        return "support-cv" if cross_validates and shots >= 2 else "fixed"
    if selection == "validation" and shots is not None:
        raise ConfigError(
            f"selection 'validation' would show a {shots}-shot run every labelled image of the "
            "validation split; choose support-cv, kshot-val (CoOp) or fixed"
        )
    if selection == "kshot-val" and shots is None:
        raise ConfigError("selection 'kshot-val' needs method_options.shots (K images per class)")
    if selection == "support-cv":
        if not cross_validates:
            raise ConfigError(
                "this method cannot select by cross-validation on the support set; choose "
                "kshot-val (CoOp) or fixed"
            )
        if shots is not None and shots < 2:
            raise ConfigError(
                "selection 'support-cv' needs at least 2 shots per class (one to fit, one to "
                "score); choose fixed or kshot-val"
            )
    return selection


def labelled_budget(
    train: ClinicalDataset,
    val: ClinicalDataset | None,
    options: Options,
    seed: int,
    *,
    cross_validates: bool = False,
) -> LabelledBudget:
    """The support set and validation set a fit with ``options`` may use.

    Deterministic in ``seed``, and a no-op on a set that already is K-shot, so a method may
    apply it to what the runner already restricted. Too few images of a class is a DataError.
    """
    few_shot = isinstance(options, FewShotOptions)
    shots = options.shots if few_shot else None
    asked = options.selection if few_shot else "auto"
    selection = resolve_selection(asked, shots, cross_validates)
    if shots is not None and not _is_kshot(train, shots):
        train = sample_few_shot(train, shots, seed)
    if selection in ("support-cv", "fixed"):
        val = None
    elif selection == "kshot-val" and val is not None:
        k = min(int(shots), KSHOT_VAL_MAX)
        if not _is_kshot(val, k):
            exclude = set(train.meta("patient_id")) if train.has_meta("patient_id") else None
            if exclude is not None and not val.has_meta("patient_id"):
                exclude = None
            val = sample_few_shot(val, k, seed, exclude_patients=exclude)
    return LabelledBudget(train, val, shots, selection)


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """A fold number per sample: each class's members dealt round-robin in a seeded order.

    With ``n_folds`` at most the smallest class count, every fold holds out at least one
    image of each class and keeps at least one of each to fit on.
    """
    y = np.asarray(y)
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = np.random.default_rng([seed, int(c), 7]).permutation(np.flatnonzero(y == c))
        fold[members] = np.arange(len(members)) % n_folds
    return fold


def n_cv_folds(y: np.ndarray, cv_folds: int) -> int:
    """The number of support-cv folds: at most ``cv_folds`` and the smallest class count."""
    counts = np.bincount(np.asarray(y))
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    if smallest < 2:
        raise ConfigError(
            "support-cv needs at least 2 support images in every class; choose fixed or kshot-val"
        )
    return min(cv_folds, smallest)
