"""Natural shifts from metadata: the dataset's own split, source/target domains, leave-one-domain-out."""

from __future__ import annotations

from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.shifts.base import SHIFTS, ShiftSplit, ensure_splits, val_or_none


@SHIFTS.register("none")
def no_shift(ds: ClinicalDataset, seed: int = 0) -> ShiftSplit:
    ds = ensure_splits(ds, seed=seed)
    val = val_or_none(ds, split="val")
    return ShiftSplit("none", ds.split("train"), val, {"test": ds.split("test")}, ["test"])


@SHIFTS.register("domain")
def domain_shift(
    ds: ClinicalDataset,
    seed: int = 0,
    source: str | list[str] | None = None,
    key: str = "domain",
    target_split: str = "all",
) -> ShiftSplit:
    """Train on ``source`` domains; test on their held-out test split and on every other domain.

    ``target_split='all'`` tests on all images of the unseen domains (none were trained on);
    ``'test'`` restricts them to their test split.
    """
    if not ds.has_meta(key):
        raise DataError(
            f"{ds.name}: the 'domain' shift needs {key!r} metadata (a site or scanner per image); "
            f"it has {sorted(ds.metadata) or 'none'}. Use --shift none, or add a {key!r} column."
        )
    ds = ensure_splits(ds, seed=seed)
    domains = sorted(set(ds.meta(key).tolist()))
    sources = [source] if isinstance(source, str) else list(source or domains[:1])
    unknown = [s for s in sources if s not in domains]
    if unknown:
        raise ConfigError(f"source domain(s) {unknown} not in {ds.name}; domains: {domains}")
    if target_split not in ("all", "test"):
        raise ConfigError(f"target_split must be 'all' or 'test', got {target_split!r}")
    train = ds.where(**{key: sources, "split": "train"})
    val = val_or_none(ds, **{key: sources, "split": "val"})
    tests: dict[str, ClinicalDataset] = {}
    for d in domains:
        if d in sources:
            tests[d] = ds.where(**{key: d, "split": "test"})
        elif target_split == "all":
            tests[d] = ds.where(**{key: d})
        else:
            tests[d] = ds.where(**{key: d, "split": "test"})
    opts = {"source": sources, "key": key, "target_split": target_split}
    return ShiftSplit("domain", train, val, tests, list(sources), opts)


@SHIFTS.register("lodo")
def leave_one_domain_out(
    ds: ClinicalDataset, seed: int = 0, holdout: str | None = None, key: str = "domain"
) -> ShiftSplit:
    """Hold out ``holdout`` (default: the first domain); train on the train split of the others.

    Tests are every image of the held-out domain plus each source domain's test split; a sweep
    over ``shift_options.holdout`` gives the full leave-one-domain-out protocol.
    """
    if not ds.has_meta(key):
        raise DataError(
            f"{ds.name}: the 'lodo' shift needs {key!r} metadata; it has "
            f"{sorted(ds.metadata) or 'none'}"
        )
    ds = ensure_splits(ds, seed=seed)
    domains = sorted(str(d) for d in set(ds.meta(key)))
    if len(domains) < 2:
        raise DataError(f"{ds.name}: 'lodo' needs at least two {key} values, got {domains}")
    holdout = domains[0] if holdout is None else holdout
    if holdout not in domains:
        raise ConfigError(f"holdout domain {holdout!r} not in {ds.name}; domains: {domains}")
    sources = [d for d in domains if d != holdout]
    train = ds.where(**{key: sources, "split": "train"})
    val = val_or_none(ds, **{key: sources, "split": "val"})
    tests = {holdout: ds.where(**{key: holdout})}
    for d in sources:
        tests[d] = ds.where(**{key: d, "split": "test"})
    opts = {"holdout": holdout, "key": key, "source": sources}
    return ShiftSplit("lodo", train, val, tests, sources, opts)
