"""Datasets: the built-in clinical-shift data, MedMNIST, image folders, CSV manifests, DICOM, NIfTI.

Importing this package is cheap: the registry is declared as data, and the readers (and numpy,
torch) are imported when a dataset is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinadapt.data.registry import DATASETS
from clinadapt.errors import DataError

if TYPE_CHECKING:
    from clinadapt.data.base import ClinicalDataset

_LAZY = {
    name: "clinadapt.data.base"
    for name in ("META_KEYS", "ArraySource", "ClinicalDataset", "FileSource", "ImageSource")
} | {"check_image": "clinadapt.data.base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clinadapt.data' has no attribute {name!r}")


def load_dataset(name_or_path: str | Path, **kwargs: Any) -> ClinicalDataset:
    """Load a registered dataset by name, or a dataset from a path.

    A generated dataset (registry tag ``generated``: a function of its options alone, like the
    built-in ``clinical-shift``) is built once per process for each set of options
    (``data.cache``); every call returns a copy its caller may change freely.

    Paths: a directory of class folders (or with a ``manifest.csv``), a ``.csv`` manifest, a
    MedMNIST ``.npz`` file (2D or 3D), or a NIfTI volume (``.nii``/``.nii.gz``) read as 2D slices.
    Segmentation: a directory with ``images/`` and ``masks/`` (optionally under split folders),
    a manifest with a ``mask`` column, or a NIfTI volume with ``labels=`` its label volume.
    Volumes (``volumes=True``, see :func:`clinadapt.data.volume_io.load_volume_dataset`): a
    NIfTI file, a DICOM series folder or a CSV manifest of them; a folder with ``imagesTr/`` and
    ``labelsTr/`` (nnU-Net, MSD) is read as volumes without asking.
    """
    key = str(name_or_path)
    if key in DATASETS and "generated" in DATASETS.entry(key).tags:
        from clinadapt.data.cache import load_cached  # a function of its options: built once

        return load_cached(key, DATASETS.get(key), kwargs)
    return dataset_reader(name_or_path, kwargs)(**kwargs)


def dataset_reader(
    name_or_path: str | Path, options: dict[str, Any] | None = None
) -> Callable[..., ClinicalDataset]:
    """The function that reads ``name_or_path`` given ``options`` (its path already bound)."""
    options = options or {}
    key = str(name_or_path)
    if key in DATASETS:
        return DATASETS.get(key)
    path = Path(key).expanduser()
    if not path.exists():
        raise DataError(
            f"{key!r} is neither a registered dataset ({', '.join(DATASETS.names())}) "
            "nor an existing path"
        )
    from clinadapt.data import folder, medmnist, nifti, seg_readers, volume_io

    name = path.name.lower()
    if options.get("volumes") or (path / "imagesTr").is_dir():
        return partial(volume_io.load_volume_dataset, path)
    if path.is_dir():
        if (path / "manifest.csv").exists():
            return partial(_manifest_reader(path / "manifest.csv", options), path / "manifest.csv")
        if seg_readers.is_mask_folder(path):
            return partial(seg_readers.load_mask_folder, path)
        return partial(folder.load_image_folder, path)
    if name.endswith(".csv"):
        return partial(_manifest_reader(path, options), path)
    if name.endswith(".npz"):
        return partial(medmnist.load_medmnist_npz, path)
    if name.endswith((".nii", ".nii.gz")):
        if "labels" in options:
            return partial(seg_readers.load_nifti_segmentation, path)
        return partial(nifti.load_nifti_volume, path)
    raise DataError(
        f"{key}: cannot tell how to read this file; give a directory, a .csv manifest, a "
        "MedMNIST .npz or a NIfTI volume"
    )


def _manifest_reader(path: Path, options: dict[str, Any]) -> Callable[..., ClinicalDataset]:
    """A CSV manifest: segmentation when it has a mask column, else classification."""
    from clinadapt.data import folder, seg_readers

    if seg_readers.has_mask_column(path, options.get("mask_col", "mask")):
        return seg_readers.load_seg_manifest
    return folder.load_manifest


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


__all__ = [
    "DATASETS",
    "META_KEYS",
    "ArraySource",
    "ClinicalDataset",
    "FileSource",
    "ImageSource",
    "check_image",
    "dataset_reader",
    "list_datasets",
    "load_dataset",
]
