"""MedMNIST v2 / MedMNIST+ datasets, 2D and 3D, from their official ``.npz`` files.

Each file holds ``{train,val,test}_{images,labels}``: images uint8 (N,S,S) grey or (N,S,S,3) RGB,
labels (N,1) class indices (or (N,14) multi-hot for ChestMNIST). File names are ``<flag>.npz``
for 28x28 and ``<flag>_<size>.npz`` for 64/128/224. The 3D sets (OrganMNIST3D, NoduleMNIST3D,
AdrenalMNIST3D, FractureMNIST3D, VesselMNIST3D, SynapseMNIST3D) hold uint8 (N,S,S,S) volumes at
28 or 64 and read as a :class:`~clinadapt.data.volume.VolumeDataset`. The facts about each set (label maps, tasks,
channel counts, MD5s, Zenodo record) are data: ``medmnist.json``, read by ``medmnist_info``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from clinadapt.data.base import ClinicalDataset, ImageSource
from clinadapt.data.medmnist_info import (
    FLAGS,
    FLAGS_3D,
    INFO,
    SIZES,
    ZENODO_RECORD,
    MedMNISTInfo,
    Task,
    medmnist_info,
)
from clinadapt.data.registry import DATASETS
from clinadapt.data.volume import VolumeDataset, VolumeSource
from clinadapt.env import env_flag
from clinadapt.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
_PROBE_HOST = ("zenodo.org", 443)


class NpzSource(ImageSource):
    """Images of one or more MedMNIST splits, kept as separate arrays (no concatenated copy)."""

    # the 3D sets: (N,S,S,S) uint8 volumes, loaded as float32 in [0, 1]
    volumes: bool = False

    def __init__(self, arrays: Sequence[np.ndarray], names: Sequence[str], origin: str) -> None:
        self.arrays = list(arrays)
        self.names = list(names)
        self.origin = origin
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self._fp: str | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.origin}: image {i} out of range (0..{len(self) - 1})")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def load(self, i: int) -> np.ndarray:
        k, j = self._locate(i)
        return self.arrays[k][j]

    def describe(self, i: int) -> str:
        k, j = self._locate(i)
        return f"{self.origin}[{self.names[k]} #{j}]"

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256()
            for name, a in zip(self.names, self.arrays, strict=True):
                h.update(f"{name}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).data)
            self._fp = h.hexdigest()
        return self._fp


class NpzVolumes(NpzSource, VolumeSource):
    """The volumes of a MedMNIST 3D file's splits (uint8 on disk, float32 [0,1] when loaded)."""

    volumes = True

    def load(self, i: int) -> np.ndarray:
        return super().load(i).astype(np.float32) / 255.0


def _check_size(size: int, where: str, info: MedMNISTInfo | None = None) -> None:
    sizes = info.sizes if info is not None else SIZES
    if size not in sizes:
        kind = " 3D" if info is not None and info.dims == 3 else ""
        raise DataError(f"{where}: unsupported MedMNIST{kind} size {size}; sizes are {sizes}")


def default_root() -> Path:
    """``$CLINADAPT_DATA_DIR`` when set, else ``~/.cache/clinadapt/data/medmnist``."""
    env = os.environ.get("CLINADAPT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "clinadapt" / "data" / "medmnist"


def is_online(timeout: float = 2.0) -> bool:
    """False under ``CLINADAPT_OFFLINE=1``, else whether Zenodo answers a TCP connect in time."""
    if env_flag("CLINADAPT_OFFLINE"):
        return False
    try:
        with socket.create_connection(_PROBE_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str | None) -> None:
    """Fetch ``url`` into a temporary file beside ``dest``, check its MD5, then rename it."""
    from clinadapt.progress import bar

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            with bar(
                total=total or None, desc=f"download {dest.name}", unit="B", unit_scale=True
            ) as pb:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    pb.update(len(chunk))
        if md5 is not None and h.hexdigest() != md5:
            raise DataError(
                f"downloaded {url} but its MD5 is {h.hexdigest()}, expected {md5}; "
                f"the file was discarded. Retry, or put a good copy at {dest}"
            )
        os.replace(tmp, dest)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"cannot download {url}: {type(e).__name__}: {e}. Download it by hand and put it at "
            f"{dest}"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def medmnist_path(
    flag: str, size: int = 28, root: str | Path | None = None, download: bool = True
) -> Path:
    """The local path of ``<flag>[_<size>].npz``, downloading it when allowed and online."""
    info = medmnist_info(flag)
    _check_size(size, flag, info)
    fname, url = info.file_name(size), info.url(size)
    folder = Path(root).expanduser() if root is not None else default_root()
    path = folder / fname
    if path.is_file():
        return path
    if root is None:  # the medmnist package's own cache, read-only
        legacy = Path.home() / ".medmnist" / fname
        if legacy.is_file():
            return legacy
    if not download:
        reason = "download=False"
    elif not is_online():
        reason = "offline (CLINADAPT_OFFLINE=1 or zenodo.org unreachable)"
    else:
        _download(url, path, info.md5.get(size))
        return path
    raise DataError(
        f"MedMNIST file {fname} is not in {folder} and cannot be downloaded ({reason}). "
        f"Download {url} and put it in {folder} (or pass root=..., or set CLINADAPT_DATA_DIR)"
    )


def load_medmnist(
    flag: str,
    size: int = 28,
    root: str | Path | None = None,
    download: bool = True,
    split: str | Sequence[str] | None = None,
) -> ClinicalDataset:
    """Load a MedMNIST dataset (all splits, or the named ones) from its official ``.npz``."""
    path = medmnist_path(flag, size, root, download)
    return load_medmnist_npz(path, flag=flag, split=split, size=size)


_NAME_RE = re.compile(r"^([a-z0-9]+?)(?:_(\d+))?\.npz$")


def _parse_name(path: Path) -> tuple[str | None, int | None]:
    m = _NAME_RE.match(path.name.lower())
    if not m:
        return None, None
    return m.group(1), int(m.group(2)) if m.group(2) else 28


def _check_split_arrays(
    where: str,
    info: MedMNISTInfo,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    size: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    k = len(info.class_names)
    if images.dtype != np.uint8:
        raise DataError(f"{where}: {split}_images are {images.dtype}, expected uint8")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if info.dims == 3:
        if images.ndim == 5 and images.shape[1] == 1:  # (N,1,S,S,S)
            images = images[:, 0]
        if images.ndim != 4:
            raise DataError(
                f"{where}: {split}_images have shape {images.shape}; {info.flag} holds "
                "(N,S,S,S) volumes"
            )
        if len(set(images.shape[1:])) != 1:
            raise DataError(f"{where}: {split}_images are not cubes: {images.shape}")
    else:
        want_ndim = 3 if info.n_channels == 1 else 4
        if images.ndim != want_ndim or (want_ndim == 4 and images.shape[-1] != info.n_channels):
            want = "(N,H,W)" if info.n_channels == 1 else f"(N,H,W,{info.n_channels})"
            raise DataError(
                f"{where}: {split}_images have shape {images.shape}; {info.flag} images are {want}"
            )
        if images.shape[1] != images.shape[2]:
            raise DataError(f"{where}: {split}_images are not square: {images.shape}")
    if size is not None and images.shape[1] != size:
        side = "x".join(str(v) for v in images.shape[1 : 1 + info.dims])
        raise DataError(f"{where}: {split}_images are {side} but the file is for size {size}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"{where}: {split}_labels are {labels.dtype}, expected integers")
    if len(labels) != len(images):
        raise DataError(f"{where}: {len(images)} {split}_images but {len(labels)} {split}_labels")
    labels = labels.astype(np.int64)
    if info.task == "multilabel":
        if labels.ndim != 2 or labels.shape[1] != k:
            raise DataError(f"{where}: {split}_labels have shape {labels.shape}; expected (N, {k})")
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            row = int(np.argwhere(bad)[0, 0])
            raise DataError(
                f"{where}: {split}_labels row {row} holds {labels[row].tolist()}; "
                "multi-label targets must be 0/1"
            )
        return images, labels
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where}: {split}_labels have shape {labels.shape}; expected (N, 1)")
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: {split}_labels[{row}] = {labels[row]} is outside the {k} classes of "
            f"{info.flag} (0..{k - 1})"
        )
    return images, labels


def load_medmnist_npz(
    path: str | Path,
    flag: str | None = None,
    *,
    split: str | Sequence[str] | None = None,
    size: int | None = None,
) -> ClinicalDataset:
    """Read an official MedMNIST ``.npz``; the flag (and size) come from its name unless given."""
    path = Path(path).expanduser()
    where = str(path)
    name_flag, name_size = _parse_name(path)
    if flag is None:
        if name_flag is None or name_flag not in INFO:
            raise DataError(
                f"{where}: cannot tell the MedMNIST flag from the file name; name it "
                f"'<flag>.npz' or '<flag>_<size>.npz', or pass flag= (one of {', '.join(FLAGS)})"
            )
        flag = name_flag
    info = medmnist_info(flag)
    if size is None and name_flag == flag:
        size = name_size
    if size is not None:
        _check_size(size, where, info)
    splits = list(SPLITS) if split is None else [split] if isinstance(split, str) else list(split)
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"{where}: unknown split {s!r}; MedMNIST splits are {SPLITS}")
    if not path.is_file():
        raise DataError(f"{where}: no such MedMNIST file")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip/npy, truncated, pickled: all "cannot read"
        raise DataError(f"{where}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if not hasattr(npz, "files"):
        raise DataError(f"{where}: holds a single array, not the MedMNIST train/val/test keys")
    arrays, labels, names = [], [], []
    with npz:
        wanted = [f"{s}_{kind}" for s in splits for kind in ("images", "labels")]
        missing = [key for key in wanted if key not in npz.files]
        if missing:
            raise DataError(f"{where}: missing keys {missing}; the file has {sorted(npz.files)}")
        for s in splits:
            try:
                imgs, labs = npz[f"{s}_images"], npz[f"{s}_labels"]
            except Exception as e:  # a corrupt member of the zip
                raise DataError(f"{where}: cannot read {s} arrays ({type(e).__name__}: {e})") from e
            imgs, labs = _check_split_arrays(where, info, s, imgs, labs, size)
            if len(imgs):
                arrays.append(imgs)
                labels.append(labs)
                names.append(s)
    if not arrays:
        raise DataError(f"{where}: the {'/'.join(splits)} split(s) hold no images")
    split_meta = np.concatenate([np.full(len(a), s) for a, s in zip(arrays, names, strict=True)])
    metadata = {"split": split_meta}
    if info.domains:
        metadata["domain"] = np.array([info.domains[s] for s in split_meta])
    shape_size = arrays[0].shape[1]
    name = info.flag if shape_size == 28 else f"{info.flag}_{shape_size}"
    if info.dims == 3:
        return _volume_dataset(info, name, arrays, names, labels, metadata, where, shape_size)
    return ClinicalDataset(
        name=name,
        source=NpzSource(arrays, names, where),
        labels=np.concatenate(labels),
        class_names=list(info.class_names),
        task=info.task,
        modality=info.modality,
        metadata=metadata,
    )


def _volume_dataset(
    info: MedMNISTInfo,
    name: str,
    arrays: list[np.ndarray],
    names: list[str],
    labels: list[np.ndarray],
    metadata: dict[str, np.ndarray],
    where: str,
    size: int,
) -> VolumeDataset:
    """A MedMNIST 3D file as volumes, with the published voxel size where there is one."""
    mm = (info.spacing_mm or {}).get(size)
    n = sum(len(a) for a in arrays)
    notes = [] if mm is not None else [f"{info.flag}: {info.note or 'voxel size not published'}"]
    return VolumeDataset(
        name=name,
        source=NpzVolumes(arrays, names, where),
        labels=np.concatenate(labels),
        class_names=list(info.class_names),
        task=info.task,
        modality=info.modality,
        metadata=metadata,
        spacing=None if mm is None else np.full((n, 3), mm),
        spacing_origin="MedMNIST field of view" if mm is not None else "assumed 1 mm (unknown)",
        notes=notes,
    )


__all__ = [
    "FLAGS",
    "FLAGS_3D",
    "INFO",
    "SIZES",
    "SPLITS",
    "ZENODO_RECORD",
    "MedMNISTInfo",
    "Task",
    "load_medmnist",
    "load_medmnist_npz",
    "medmnist_info",
    "medmnist_path",
]

for _flag in INFO:  # declared (help, tags) in data/registry.py from medmnist.json
    DATASETS.register(_flag, partial(load_medmnist, _flag))
