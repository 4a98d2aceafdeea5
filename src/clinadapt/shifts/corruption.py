"""The ``corruption`` protocol: train clean, test clean and under each artefact x severity."""

from __future__ import annotations

from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError
from clinadapt.shifts.base import SHIFTS, ShiftSplit, ensure_splits, val_or_none
from clinadapt.shifts.corruptions import SEVERITIES, corrupted, corruptions_for, get_corruption

CLEAN = "clean"


def corruption_set_name(name: str, severity: int) -> str:
    """The test-set name of one corruption at one severity, e.g. ``jpeg@3``."""
    return f"{name}@{severity}"


def parse_set_name(set_name: str) -> tuple[str, int] | None:
    """``("jpeg", 3)`` for ``"jpeg@3"``; None for any other test-set name."""
    name, sep, sev = set_name.rpartition("@")
    if not sep or not sev.isdigit():
        return None
    return name, int(sev)


@SHIFTS.register("corruption")
def corruption_shift(
    ds: ClinicalDataset,
    seed: int = 0,
    corruptions: str | list[str] | None = None,
    severities: int | list[int] | None = None,
    source: str | list[str] | None = None,
    key: str = "domain",
) -> ShiftSplit:
    """Test sets: ``clean`` and ``<corruption>@<severity>`` for each chosen pair.

    ``corruptions`` defaults to every corruption of the dataset's modality and ``severities`` to
    1..5; ``source`` restricts training and testing to some domains (default: all of them).
    """
    names = [corruptions] if isinstance(corruptions, str) else corruptions
    names = list(names) if names else corruptions_for(ds.modality, ds.spatial_dims)
    for n in names:
        get_corruption(n)
    sevs = [severities] if isinstance(severities, int) else list(severities or SEVERITIES)
    bad = [s for s in sevs if s not in SEVERITIES]
    if bad:
        raise ConfigError(f"corruption shift: severities must be in {SEVERITIES}, got {bad}")
    ds = ensure_splits(ds, seed=seed)
    if source is not None:
        ds = ds.where(**{key: source})
    clean = ds.split("test")
    tests = {CLEAN: clean}
    for n in names:
        for s in sevs:
            tests[corruption_set_name(n, s)] = corrupted(clean, n, s, seed)
    opts = {
        "corruptions": names,
        "severities": sevs,
        "source": source,
        "key": key,
        # what each severity is, and where the levels come from (MedMNIST-C or the SSIM band)
        "levels": {n: {str(s): get_corruption(n).level(s) for s in sevs} for n in names},
        "calibration": {n: get_corruption(n).calibration for n in names},
    }
    return ShiftSplit(
        "corruption", ds.split("train"), val_or_none(ds, split="val"), tests, [CLEAN], opts
    )
