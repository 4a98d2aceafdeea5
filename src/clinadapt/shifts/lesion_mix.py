"""The ``lesion-mix`` protocol: the same segmentation test images resampled to another mix of
empty images and object sizes (the segmentation counterpart of a prevalence shift)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.seg_metrics import SIZE_EDGES_MM, size_bin_names
from clinadapt.shifts.base import SHIFTS, ShiftSplit, ensure_splits, val_or_none
from clinadapt.shifts.prevalence import resample_groups

EMPTY = "empty"


def size_groups(
    ds: SegmentationDataset, cls: str, edges_mm: Sequence[float] = SIZE_EDGES_MM
) -> tuple[np.ndarray, list[str]]:
    """Each image's group for class ``cls``: ``empty`` or the bin of its reference size.

    The size is the diameter (mm) of a disc with the class's reference area in that image, the
    same binning as the metrics' ``size_bins``.
    """
    if cls not in ds.class_names:
        raise ConfigError(f"lesion-mix: class {cls!r} is not among {ds.class_names}")
    c = ds.class_names.index(cls)
    diam = 2.0 * np.sqrt(ds.areas_mm2()[:, c] / np.pi)
    edges = sorted(float(e) for e in edges_mm)
    groups = np.where(ds.areas[:, c] == 0, 0, 1 + np.digitize(diam, edges))
    return groups, [EMPTY, *size_bin_names(edges)]


def lesion_mix(
    ds: SegmentationDataset,
    groups: np.ndarray,
    names: list[str],
    mix: Mapping[str, float] | None = None,
    empty_fraction: float | None = None,
) -> np.ndarray:
    """The target proportions over ``names``: ``mix`` as given, or the current sizes with
    ``empty_fraction`` empty images."""
    if (mix is None) == (empty_fraction is None):
        raise ConfigError(
            f"lesion-mix: give either mix (proportions over {names}) or empty_fraction"
        )
    if mix is not None:
        unknown = [k for k in mix if k not in names]
        if unknown:
            raise ConfigError(f"lesion-mix: unknown group(s) {unknown}; groups: {names}")
        out = np.array([float(mix.get(k, 0.0)) for k in names])
    else:
        if not 0.0 <= float(empty_fraction) <= 1.0:
            raise ConfigError(f"lesion-mix: empty_fraction must be in [0, 1], got {empty_fraction}")
        have = np.bincount(groups, minlength=len(names)).astype(float)
        if have[1:].sum() == 0 and empty_fraction < 1:
            raise DataError(f"{ds.name}: no image has the object, so no non-empty share to keep")
        sizes = have[1:] / max(have[1:].sum(), 1.0)
        out = np.concatenate([[float(empty_fraction)], (1.0 - float(empty_fraction)) * sizes])
    if (out < 0).any() or not np.isclose(out.sum(), 1.0, atol=1e-6):
        raise ConfigError(f"lesion-mix: proportions must be >= 0 and sum to 1, got {out.tolist()}")
    return out


@SHIFTS.register("lesion-mix")
def lesion_mix_shift(
    ds: SegmentationDataset,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    empty_fraction: float | None = None,
    cls: str | None = None,
    edges_mm: list[float] | None = None,
    size: int | None = None,
    replace: bool = False,
    source: str | list[str] | None = None,
    key: str = "domain",
) -> ShiftSplit:
    """Train on the train split; test on the test split as it is and resampled (``lesion-mix``).

    ``cls`` is the class whose presence and size define the groups (default: the last class,
    the lesion in ``("organ", "lesion")`` data); ``edges_mm`` the size-bin edges (default
    10 and 30 mm). ``mix`` maps groups (``empty``, ``<10 mm``, ...) to proportions, or
    ``empty_fraction`` sets the share of empty images and keeps the sizes as they were.
    """
    if not isinstance(ds, SegmentationDataset):
        raise DataError(
            f"{ds.name}: the lesion-mix shift needs segmentation data; use prevalence for classes"
        )
    if source is not None:
        ds = ds.where(**{key: source})
    ds = ensure_splits(ds, seed=seed)
    cls = cls or ds.class_names[-1]
    edges = list(SIZE_EDGES_MM if edges_mm is None else edges_mm)
    test = ds.split("test")
    groups, names = size_groups(test, cls, edges)
    target = lesion_mix(test, groups, names, mix, empty_fraction)
    pos = resample_groups(groups, names, target, size, replace, seed, test.name, "group(s)")
    shifted = test.subset(pos, name=f"{test.name}[lesion-mix]")
    before = np.bincount(groups, minlength=len(names)) / len(groups)
    opts = {
        "cls": cls,
        "edges_mm": edges,
        "groups": names,
        "mix": target.tolist(),
        "test_mix": before.tolist(),
        "size": len(shifted),
        "replace": replace,
        "source": source,
        "key": key,
    }
    return ShiftSplit(
        "lesion-mix",
        ds.split("train"),
        val_or_none(ds, split="val"),
        {"test": test, "lesion-mix": shifted},
        ["test"],
        opts,
    )
