"""The ``prevalence`` protocol: the same test images resampled to another class mix."""

from __future__ import annotations

import numpy as np

from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts.base import SHIFTS, ShiftSplit, ensure_splits, val_or_none


def class_mix(ds: ClinicalDataset, prevalence: list[float] | dict[str, float]) -> np.ndarray:
    """The target class proportions as a (K,) array that sums to one."""
    k = ds.num_classes
    if isinstance(prevalence, dict):
        unknown = [c for c in prevalence if c not in ds.class_names]
        if unknown:
            raise ConfigError(f"prevalence: unknown class(es) {unknown}; classes: {ds.class_names}")
        mix = np.array([float(prevalence.get(c, 0.0)) for c in ds.class_names])
    else:
        mix = np.asarray(prevalence, dtype=np.float64)
        if mix.shape != (k,):
            raise ConfigError(
                f"prevalence: give {k} proportions (one per class {ds.class_names}), got {len(mix)}"
            )
    if (mix < 0).any() or not np.isclose(mix.sum(), 1.0, atol=1e-6):
        raise ConfigError(f"prevalence: proportions must be >= 0 and sum to 1, got {mix.tolist()}")
    return mix


def resample_groups(
    groups: np.ndarray,
    names: list[str],
    mix: np.ndarray,
    size: int | None,
    replace: bool,
    seed: int,
    where: str,
    what: str = "class(es)",
) -> np.ndarray:
    """Seeded positions whose group counts follow ``mix`` (largest remainder).

    ``groups`` holds each image's group index into ``names``. Without replacement ``size``
    defaults to the largest size the rarest needed group allows; with replacement, to the
    number of images. Asking for more images of a group than exist is an error.
    """
    have = np.bincount(groups, minlength=len(names))
    missing = [names[c] for c in np.flatnonzero((mix > 0) & (have == 0))]
    if missing:
        raise DataError(f"{where}: no images of {what} {missing} to resample from")
    if size is None:
        need = mix > 0
        size = len(groups) if replace else int(np.floor(np.min(have[need] / mix[need]) + 1e-9))
    if size < 1:
        raise ConfigError(f"prevalence: size must be >= 1, got {size}")
    exact = mix * size
    counts = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - counts), kind="stable")[: size - counts.sum()]:
        counts[c] += 1
    if not replace and (counts > have).any():
        c = int(np.flatnonzero(counts > have)[0])
        raise DataError(
            f"{where}: the mix needs {counts[c]} images of {names[c]!r} but only "
            f"{have[c]} exist; lower size, or set replace=True"
        )
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(groups == c), counts[c], replace=replace)
        for c in range(len(names))
        if counts[c]
    ]
    return rng.permutation(np.concatenate(picks))


def resample_to_prevalence(
    ds: ClinicalDataset,
    prevalence: list[float] | dict[str, float],
    size: int | None = None,
    replace: bool = False,
    seed: int = 0,
) -> ClinicalDataset:
    """A seeded resample of ``ds`` whose class counts follow ``prevalence`` (largest remainder).

    Without replacement ``size`` defaults to the largest size the rarest needed class allows; with
    replacement, to ``len(ds)``. Asking for more images of a class than exist is an error.
    """
    if ds.task == "multilabel":
        raise DataError(f"{ds.name}: prevalence shift needs single-label data, not multi-label")
    if ds.task == "segmentation":
        raise DataError(
            f"{ds.name}: for segmentation data use the lesion-mix shift (empty images and "
            "lesion sizes) instead of the class prevalence shift"
        )
    mix = class_mix(ds, prevalence)
    pos = resample_groups(ds.labels, ds.class_names, mix, size, replace, seed, ds.name)
    return ds.subset(pos, name=f"{ds.name}[prevalence]")


@SHIFTS.register("prevalence")
def prevalence_shift(
    ds: ClinicalDataset,
    seed: int = 0,
    prevalence: list[float] | dict[str, float] | None = None,
    size: int | None = None,
    replace: bool = False,
    source: str | list[str] | None = None,
    key: str = "domain",
) -> ShiftSplit:
    """Train on the train split; test on the test split as it is and resampled to ``prevalence``.

    ``source`` restricts training and testing to some domains (default: all of them).
    """
    if prevalence is None:
        raise ConfigError(
            "the prevalence shift needs shift_options.prevalence: one proportion per class "
            f"({ds.class_names}) or a mapping class -> proportion"
        )
    if source is not None:
        ds = ds.where(**{key: source})
    ds = ensure_splits(ds, seed=seed)
    test = ds.split("test")
    shifted = resample_to_prevalence(test, prevalence, size, replace, seed)
    opts = {
        "prevalence": class_mix(ds, prevalence).tolist(),
        "size": len(shifted),
        "replace": replace,
        "source": source,
        "key": key,
    }
    return ShiftSplit(
        "prevalence",
        ds.split("train"),
        val_or_none(ds, split="val"),
        {"test": test, "prevalence": shifted},
        ["test"],
        opts,
    )
