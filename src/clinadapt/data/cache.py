"""Registered datasets are built once per process: later loads get a private copy of the views.

A sweep runs many experiments on the same built-in data; generating it again for every run cost
seconds each. The cache keeps the dataset as first built; each caller gets its own labels,
metadata, index and image-source objects, and the pixel arrays they share are read-only, so no
caller can change what the next one sees.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from clinadapt.data.base import ClinicalDataset

MAX_ENTRIES = 4  # distinct (name, options) kept; the least recently used goes first
_CACHE: OrderedDict[str, ClinicalDataset] = OrderedDict()


def cache_key(name: str, options: dict[str, Any]) -> str:
    """The dataset's name and options as one canonical string."""
    return json.dumps([name, options], sort_keys=True, default=repr)


def _freeze(source: object) -> None:
    array = getattr(source, "array", None)
    if isinstance(array, np.ndarray):
        array.flags.writeable = False


def private_copy(ds: ClinicalDataset) -> ClinicalDataset:
    """A copy whose per-image arrays, metadata, class names and sources are its own objects
    (sharing the read-only pixels)."""
    changes: dict[str, Any] = {
        "class_names": list(ds.class_names),
        "metadata": {k: v.copy() for k, v in ds.metadata.items()},
        "index": ds.index.copy(),
        "source": copy.copy(ds.source),
        **{f: np.array(getattr(ds, f), copy=True) for f in ds.PER_IMAGE},
    }
    if getattr(ds, "masks", None) is not None:
        changes["masks"] = copy.copy(ds.masks)
    return ds.replace(**changes)


def load_cached(
    name: str, loader: Callable[..., ClinicalDataset], options: dict[str, Any]
) -> ClinicalDataset:
    """``loader(**options)``, built once per process for each ``(name, options)``."""
    key = cache_key(name, options)
    ds = _CACHE.get(key)
    if ds is None:
        ds = loader(**options)
        _freeze(ds.source)
        _freeze(getattr(ds, "masks", None))
        _CACHE[key] = ds
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return private_copy(ds)


def clear_dataset_cache() -> None:
    """Forget every dataset built so far (the next load builds it again)."""
    _CACHE.clear()
