"""Acquisition artefacts per modality, five severities each, applied deterministically.

Declared in ``corruptions.json`` (help and the modalities each fits); each artefact's module is
imported the first time it is used.
"""

from clinadapt._lazy import lazy_exports
from clinadapt.shifts.corruptions.registry import CORRUPTIONS

_BASE = (
    "SEVERITIES",
    "CorruptedSource",
    "Corruption",
    "corrupt",
    "corrupted",
    "corruptions_for",
    "get_corruption",
    "register_corruption",
)
__getattr__ = lazy_exports(__name__, {name: "clinadapt.shifts.corruptions.base" for name in _BASE})

__all__ = ["CORRUPTIONS", *_BASE]
