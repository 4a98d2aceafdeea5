"""Shift protocols: how a dataset is split into a labelled source and the test sets it must survive."""

from clinadapt.shifts import corruption, domain, lesion_mix, prevalence  # noqa: F401  (registers)
from clinadapt.shifts.base import SHIFTS, ShiftSplit, apply_shift, ensure_splits
from clinadapt.shifts.corruptions import CORRUPTIONS, corrupt, corrupted, corruptions_for
from clinadapt.shifts.prevalence import resample_to_prevalence

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
