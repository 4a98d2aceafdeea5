"""Few-shot support sets: K images per class, seeded, nested across K and patient-disjoint."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import DataError


def few_shot_indices(
    ds: ClinicalDataset,
    shots: int,
    seed: int = 0,
    *,
    exclude_patients: Iterable[str] | None = None,
) -> np.ndarray:
    """Positions (sorted) of a K-shot support set of ``ds``; see :func:`sample_few_shot`."""
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer) or shots < 1:
        raise DataError(f"{ds.name}: shots must be a positive integer, got {shots!r}")
    n = len(ds)
    if ds.has_meta("patient_id"):
        pid = ds.meta("patient_id")
        # an empty patient id means "unknown": that image is its own patient
        patients = np.where(pid == "", np.char.add("\x00image-", np.arange(n).astype(str)), pid)
    else:
        patients = None
    eligible = np.ones(n, dtype=bool)
    excluded = {str(p) for p in exclude_patients} if exclude_patients is not None else set()
    if excluded:
        if patients is None:
            raise DataError(
                f"{ds.name}: exclude_patients needs 'patient_id' metadata, which this dataset lacks"
            )
        eligible &= ~np.isin(patients, list(excluded))
    if ds.task == "multilabel":
        members = [np.flatnonzero(ds.labels[:, c] == 1) for c in range(ds.num_classes)]
    else:
        members = [np.flatnonzero(ds.labels == c) for c in range(ds.num_classes)]
    # One permutation per class, drawn from all its members (excluded or not) and independent of
    # ``shots``: the K-shot set is then the first K rounds of the same draw, so 1-shot ⊂ 2-shot.
    orders = [_eligible_order(m, eligible, seed, c) for c, m in enumerate(members)]
    cursor = [0] * ds.num_classes
    used_patients: set[str] = set()
    used_images: set[int] = set()
    chosen: list[int] = []
    for _ in range(int(shots)):
        for c, order in enumerate(orders):  # round robin: each class takes its next free image
            while cursor[c] < len(order):
                i = int(order[cursor[c]])
                cursor[c] += 1
                if i in used_images or (patients is not None and patients[i] in used_patients):
                    continue
                chosen.append(i)
                used_images.add(i)
                if patients is not None:
                    used_patients.add(str(patients[i]))
                break
            else:
                _not_enough(ds, c, shots, members[c], eligible, patients, excluded)
    return np.sort(np.array(chosen, dtype=np.int64))


def _eligible_order(members: np.ndarray, eligible: np.ndarray, seed: int, c: int) -> np.ndarray:
    order = np.random.default_rng([seed, c]).permutation(members)
    return order[eligible[order]]


def _not_enough(ds, c, shots, members, eligible, patients, excluded) -> None:
    name = ds.class_names[c]
    what = "positive images" if ds.task == "multilabel" else "images"
    n_all = len(members)
    n_ok = int(eligible[members].sum())
    msg = f"{ds.name}: class {name!r} has {n_all} {what}"
    if excluded:
        msg += f", {n_ok} after excluding {len(excluded)} patient(s)"
    if patients is not None:
        n_pat = len(set(patients[members[eligible[members]]].tolist()))
        msg += f", from {n_pat} distinct patient(s)"
    msg += f"; {shots}-shot sampling needs {shots}"
    if patients is not None:
        msg += " images of distinct patients (one image per patient, shared across classes)"
    raise DataError(msg)


def sample_few_shot(
    ds: ClinicalDataset,
    shots: int,
    seed: int = 0,
    *,
    exclude_patients: Iterable[str] | None = None,
) -> ClinicalDataset:
    """K images per class (K positives per class for multi-label), seeded and deterministic.

    With ``patient_id`` metadata at most one image per patient is taken (so support images are
    independent); ``exclude_patients`` (e.g. the query set's patients) are never taken. With the
    same seed the K-shot set contains the (K-1)-shot set. A class with too few eligible images or
    patients is a :class:`DataError` naming it.
    """
    pos = few_shot_indices(ds, shots, seed, exclude_patients=exclude_patients)
    return ds.subset(pos, name=f"{ds.name}/{shots}-shot-seed{seed}")
