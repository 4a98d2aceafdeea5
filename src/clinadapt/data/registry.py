"""The dataset registry: declared in ``datasets.json`` and, for MedMNIST, ``medmnist.json``."""

from __future__ import annotations

from pathlib import Path

from clinadapt._registry import Registry
from clinadapt.data.medmnist_info import INFO, LOADER_OPTIONS

#: name -> loader(**kwargs) -> ClinicalDataset
DATASETS: Registry = Registry("dataset", Path(__file__).with_name("datasets.json"))
for _flag, _info in INFO.items():
    DATASETS.declare(
        _flag,
        "clinadapt.data.medmnist",
        _info.help,
        ("medmnist", _info.modality) + (("3d",) if _info.dims == 3 else ()),
        {"options": LOADER_OPTIONS},
    )
