"""Shift protocols: how a dataset is split into a labelled source and the test sets it must survive.

Declared in ``shifts.json`` (and the artefacts in ``corruptions/corruptions.json``); each
protocol's module is imported the first time it is used.
"""

from clinadapt._lazy import lazy_exports
from clinadapt.shifts.corruptions.registry import CORRUPTIONS
from clinadapt.shifts.registry import SHIFTS

__getattr__ = lazy_exports(
    __name__,
    {name: "clinadapt.shifts.base" for name in ("ShiftSplit", "apply_shift", "ensure_splits")}
    | {
        name: "clinadapt.shifts.corruptions.base"
        for name in ("corrupt", "corrupted", "corruptions_for")
    }
    | {"resample_to_prevalence": "clinadapt.shifts.prevalence"},
)

__all__ = [
    "CORRUPTIONS",
    "SHIFTS",
    "ShiftSplit",
    "apply_shift",
    "corrupt",
    "corrupted",
    "corruptions_for",
    "ensure_splits",
    "resample_to_prevalence",
]
