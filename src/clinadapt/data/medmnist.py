"""MedMNIST v2 / MedMNIST+ 2D datasets from their official ``.npz`` files.

Each file holds ``{train,val,test}_{images,labels}``: images uint8 (N,S,S) grey or (N,S,S,3) RGB,
labels (N,1) class indices (or (N,14) multi-hot for ChestMNIST). File names are ``<flag>.npz``
for 28x28 and ``<flag>_<size>.npz`` for 64/128/224. Facts below (label maps, tasks, channel counts,
MD5s, Zenodo record) follow the MedMNIST package's ``INFO`` table, version 3.0.2.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from clinadapt.data import DATASETS
from clinadapt.data.base import ClinicalDataset, ImageSource, Task
from clinadapt.env import env_flag
from clinadapt.errors import DataError

SIZES: tuple[int, ...] = (28, 64, 128, 224)
SPLITS: tuple[str, ...] = ("train", "val", "test")
ZENODO_RECORD = "https://zenodo.org/records/10519652/files"
_PROBE_HOST = ("zenodo.org", 443)

_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
_3D_FLAGS = (
    "organmnist3d",
    "nodulemnist3d",
    "adrenalmnist3d",
    "fracturemnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
)


@dataclass(frozen=True)
class MedMNISTInfo:
    """What one MedMNIST 2D dataset holds: modality, task, channels, classes, checksums."""

    flag: str
    modality: str
    what: str
    task: Task
    n_channels: int
    class_names: tuple[str, ...]
    md5: dict[int, str]  # size -> MD5 of the official file
    note: str = ""

    def file_name(self, size: int = 28) -> str:
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def url(self, size: int = 28) -> str:
        return f"{ZENODO_RECORD}/{self.file_name(size)}?download=1"


def _info(flag, modality, what, task, ch, names, md5s, note=""):
    return MedMNISTInfo(
        flag, modality, what, task, ch, tuple(names), dict(zip(SIZES, md5s, strict=True)), note
    )


INFO: dict[str, MedMNISTInfo] = {
    i.flag: i
    for i in [
        _info(
            "pathmnist",
            "pathology",
            "colorectal cancer histology (H&E)",
            "multiclass",
            3,
            [
                "adipose",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ],
            [
                "a8b06965200029087d5bd730944a56c1",
                "55aa9c1e0525abe5a6b9d8343a507616",
                "ac42d08fb904d92c244187169d1fd1d9",
                "2c51a510bcdc9cf8ddb2af93af1eadec",
            ],
            "test set from a different clinical centre (CRC-VAL-HE-7K)",
        ),
        _info(
            "chestmnist",
            "xray",
            "chest X-ray (NIH ChestX-ray14)",
            "multilabel",
            1,
            [
                "atelectasis",
                "cardiomegaly",
                "effusion",
                "infiltration",
                "mass",
                "nodule",
                "pneumonia",
                "pneumothorax",
                "consolidation",
                "edema",
                "emphysema",
                "fibrosis",
                "pleural",
                "hernia",
            ],
            [
                "02c8a6516a18b556561a56cbdd36c4a8",
                "9de6cd0b934ebb5b7426cfba5efbae16",
                "db107e5590b27930b62dbaf558aebee3",
                "45bd33e6f06c3e8cdb481c74a89152aa",
            ],
        ),
        _info(
            "dermamnist",
            "dermoscopy",
            "dermatoscopic skin lesions (HAM10000)",
            "multiclass",
            3,
            [
                "actinic keratoses and intraepithelial carcinoma",
                "basal cell carcinoma",
                "benign keratosis-like lesions",
                "dermatofibroma",
                "melanoma",
                "melanocytic nevi",
                "vascular lesions",
            ],
            [
                "0744692d530f8e62ec473284d019b0c7",
                "b70a2f5635c6199aeaa28c31d7202e1f",
                "2defd784463fa5243564e855ed717de1",
                "8974907d8e169bef5f5b96bc506ae45d",
            ],
        ),
        _info(
            "octmnist",
            "oct",
            "retinal optical coherence tomography",
            "multiclass",
            1,
            ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
            [
                "c68d92d5b585d8d81f7112f81e2d0842",
                "e229e9440236b774d9f0dfef9d07bdaf",
                "0a97e76651ace45c5d943ee3f65b63ae",
                "abc493b6d529d5de7569faaef2773ba3",
            ],
        ),
        _info(
            "pneumoniamnist",
            "xray",
            "paediatric chest X-ray",
            "binary",
            1,
            ["normal", "pneumonia"],
            [
                "28209eda62fecd6e6a2d98b1501bb15f",
                "8f4eceb4ccffa70c672198ea285246c6",
                "05b46931834c231683c68f40c47b2971",
                "d6a3c71de1b945ea11211b03746c1fe1",
            ],
        ),
        _info(
            "retinamnist",
            "fundus",
            "retinal fundus photographs (DeepDRiD), diabetic retinopathy grade",
            "multiclass",
            3,
            ["0", "1", "2", "3", "4"],
            [
                "bd4c0672f1bba3e3a89f0e4e876791e4",
                "afda852cc34dcda56f86ad2b2457dbcc",
                "e48e916a24454daf90583d4e6efb1a18",
                "eae7e3b6f3fcbda4ae613ebdcbe35348",
            ],
            "officially ordinal regression; read as 5 ordered classes (grades 0-4)",
        ),
        _info(
            "breastmnist",
            "ultrasound",
            "breast ultrasound",
            "binary",
            1,
            ["malignant", "normal, benign"],
            [
                "750601b1f35ba3300ea97c75c52ff8f6",
                "742edef2a1fd1524b2efff4bd7ba9364",
                "363e4b3f8d712e9b5de15470a2aaadf1",
                "b56378a6eefa9fed602bb16d192d4c8b",
            ],
            "class 1 ('normal, benign') is the official positive class",
        ),
        _info(
            "bloodmnist",
            "microscopy",
            "blood cell microscopy",
            "multiclass",
            3,
            [
                "basophil",
                "eosinophil",
                "erythroblast",
                "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                "lymphocyte",
                "monocyte",
                "neutrophil",
                "platelet",
            ],
            [
                "7053d0359d879ad8a5505303e11de1dc",
                "2b94928a2ae4916078ca51e05b6b800b",
                "adace1e0ed228fccda1f39692059dd4c",
                "b718ff6835fcbdb22ba9eacccd7b2601",
            ],
        ),
        _info(
            "tissuemnist",
            "microscopy",
            "kidney cortex cell microscopy (BBBC051)",
            "multiclass",
            1,
            [
                "Collecting Duct, Connecting Tubule",
                "Distal Convoluted Tubule",
                "Glomerular endothelial cells",
                "Interstitial endothelial cells",
                "Leukocytes",
                "Podocytes",
                "Proximal Tubule Segments",
                "Thick Ascending Limb",
            ],
            [
                "ebe78ee8b05294063de985d821c1c34b",
                "123ece2eba09d0aa5d698fda57103344",
                "61b955355d7425a89687b06cca3ce0c2",
                "b077128c4a949f0a4eb01517f9037b9c",
            ],
        ),
        _info(
            "organamnist",
            "ct",
            "abdominal CT, axial view",
            "multiclass",
            1,
            _ORGANS,
            [
                "68e3f8846a6bd62f0c9bf841c0d9eacc",
                "2dcccc29b88e6da5a01161ef20cda288",
                "eeae80d0a227a8d099027e1b3cfd3b60",
                "50747347e05c87dd3aaf92c49f9f3170",
            ],
        ),
        _info(
            "organcmnist",
            "ct",
            "abdominal CT, coronal view",
            "multiclass",
            1,
            _ORGANS,
            [
                "b9ceb9546e10131b32923c5bbeaea2b1",
                "3ce34a8724ea6f548e6db4744d03b6a9",
                "773c1f009daa3fe5d9a2a201b2a7ed94",
                "050f5e875dc056f6768abf94ec9995d1",
            ],
        ),
        _info(
            "organsmnist",
            "ct",
            "abdominal CT, sagittal view",
            "multiclass",
            1,
            _ORGANS,
            [
                "9ab87b696fb54e2a387ebe992d6ed5f1",
                "53a6d115339d874c25e309a994ff46d3",
                "ded0c5fa01a95dc4978b956f613e9b8e",
                "b354719e553fbbb2513d5533f52a4cb1",
            ],
        ),
    ]
}
FLAGS: tuple[str, ...] = tuple(INFO)

# PathMNIST's test set comes from another centre: a natural site shift worth keeping as metadata.
_DOMAINS = {
    "pathmnist": {"train": "NCT-CRC-HE-100K", "val": "NCT-CRC-HE-100K", "test": "CRC-VAL-HE-7K"}
}


class NpzSource(ImageSource):
    """Images of one or more MedMNIST splits, kept as separate arrays (no concatenated copy)."""

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


def medmnist_info(flag: str) -> MedMNISTInfo:
    """The facts about one MedMNIST 2D flag; DataError for an unknown one."""
    if flag in INFO:
        return INFO[flag]
    if flag in _3D_FLAGS:
        raise DataError(
            f"MedMNIST flag {flag!r} is a 3D dataset; only the 2D ones are supported: "
            f"{', '.join(FLAGS)}"
        )
    raise DataError(f"unknown MedMNIST flag {flag!r}; known 2D flags: {', '.join(FLAGS)}")


def _check_size(size: int, where: str) -> None:
    if size not in SIZES:
        raise DataError(f"{where}: unsupported MedMNIST size {size}; sizes are {SIZES}")


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
    _check_size(size, flag)
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
    """Load a MedMNIST 2D dataset (all splits, or the named ones) from its official ``.npz``."""
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
    want_ndim = 3 if info.n_channels == 1 else 4
    if images.ndim != want_ndim or (want_ndim == 4 and images.shape[-1] != info.n_channels):
        want = "(N,H,W)" if info.n_channels == 1 else f"(N,H,W,{info.n_channels})"
        raise DataError(
            f"{where}: {split}_images have shape {images.shape}; {info.flag} images are {want}"
        )
    if images.shape[1] != images.shape[2]:
        raise DataError(f"{where}: {split}_images are not square: {images.shape}")
    if size is not None and images.shape[1] != size:
        raise DataError(
            f"{where}: {split}_images are {images.shape[1]}x{images.shape[2]} but the file "
            f"is for size {size}"
        )
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
        _check_size(size, where)
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
    if flag in _DOMAINS:
        metadata["domain"] = np.array([_DOMAINS[flag][s] for s in split_meta])
    shape_size = arrays[0].shape[1]
    return ClinicalDataset(
        name=info.flag if shape_size == 28 else f"{info.flag}_{shape_size}",
        source=NpzSource(arrays, names, where),
        labels=np.concatenate(labels),
        class_names=list(info.class_names),
        task=info.task,
        modality=info.modality,
        metadata=metadata,
    )


def _help(info: MedMNISTInfo) -> str:
    k = len(info.class_names)
    task = {"multiclass": "multi-class", "binary": "binary", "multilabel": "multi-label"}[info.task]
    if info.flag == "retinamnist":
        task = "ordinal grades read as multi-class"
    return f"MedMNIST {info.modality}: {info.what}; {k} classes, {task}"


for _flag, _i in INFO.items():
    if _flag not in DATASETS:
        DATASETS.register(
            _flag, partial(load_medmnist, _flag), help=_help(_i), tags=("medmnist", _i.modality)
        )
