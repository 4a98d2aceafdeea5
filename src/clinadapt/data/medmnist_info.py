"""The facts about each MedMNIST dataset, read from ``medmnist.json`` (no heavy imports).

The table follows the MedMNIST package's ``INFO`` (version 3.0.2): label maps, tasks, channel
counts, the MD5 of every official file, and the Zenodo record they come from. The six 3D sets
(``dims`` 3) come as 28^3 and 64^3 volumes; where the MedMNIST v2 paper states the field of
view, ``spacing_mm`` gives the voxel size per file size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clinadapt.errors import DataError

Task = Literal["binary", "multiclass", "multilabel"]
_TABLE = json.loads(Path(__file__).with_name("medmnist.json").read_text())
ZENODO_RECORD: str = _TABLE["zenodo_record"]
SIZES: tuple[int, ...] = tuple(_TABLE["sizes"])
SIZES_3D: tuple[int, ...] = tuple(_TABLE["sizes_3d"])
#: what each keyword of ``load_medmnist`` does (the dataset listing shows it)
LOADER_OPTIONS: dict[str, str] = dict(_TABLE["loader_options"])


@dataclass(frozen=True)
class MedMNISTInfo:
    """What one MedMNIST dataset holds: modality, task, channels, classes, checksums."""

    flag: str
    modality: str
    what: str
    task: Task
    n_channels: int
    class_names: tuple[str, ...]
    md5: dict[int, str]  # size -> MD5 of the official file
    note: str = ""
    domains: dict[str, str] | None = None  # split -> domain, where the splits differ in origin
    dims: int = 2  # 3 for the volume sets
    spacing_mm: dict[int, float] | None = None  # isotropic voxel size per file size, if published

    @property
    def sizes(self) -> tuple[int, ...]:
        return SIZES_3D if self.dims == 3 else SIZES

    def file_name(self, size: int = 28) -> str:
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def url(self, size: int = 28) -> str:
        return f"{ZENODO_RECORD}/{self.file_name(size)}?download=1"

    @property
    def help(self) -> str:
        """The one-line description the dataset listing shows."""
        k = len(self.class_names)
        task = {"multiclass": "multi-class", "binary": "binary", "multilabel": "multi-label"}
        kind = task[self.task]
        if self.flag == "retinamnist":
            kind = "ordinal grades read as multi-class"
        dims = " 3D volumes," if self.dims == 3 else ""
        return f"MedMNIST {self.modality}:{dims} {self.what}; {k} classes, {kind}"


INFO: dict[str, MedMNISTInfo] = {
    flag: MedMNISTInfo(
        flag=flag,
        modality=item["modality"],
        what=item["what"],
        task=item["task"],
        n_channels=int(item["n_channels"]),
        class_names=tuple(item["class_names"]),
        md5={int(size): md5 for size, md5 in item["md5"].items()},
        note=item.get("note", ""),
        domains=item.get("domains"),
        dims=int(item.get("dims", 2)),
        spacing_mm={int(k): float(v) for k, v in item["spacing_mm"].items()}
        if "spacing_mm" in item
        else None,
    )
    for flag, item in _TABLE["flags"].items()
}
FLAGS: tuple[str, ...] = tuple(INFO)
FLAGS_3D: tuple[str, ...] = tuple(f for f, i in INFO.items() if i.dims == 3)


def medmnist_info(flag: str) -> MedMNISTInfo:
    """The facts about one MedMNIST flag; DataError for an unknown one."""
    if flag in INFO:
        return INFO[flag]
    raise DataError(f"unknown MedMNIST flag {flag!r}; known flags: {', '.join(FLAGS)}")
