"""Image files, class-folder trees and CSV manifests as :class:`ClinicalDataset`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from clinadapt.data.base import ClinicalDataset, FileSource, Task, check_image, integer_classes
from clinadapt.data.dicom import Window, read_dicom, scale_to_uint8
from clinadapt.data.manifest import SPLIT_ALIASES, ManifestTable, as_index
from clinadapt.data.nifti import read_nifti_slices
from clinadapt.errors import ConfigError, DataError

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
NUMPY_EXTENSIONS = (".npy",)
IMAGE_EXTENSIONS = PIL_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS + NUMPY_EXTENSIONS


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, exts in (
        ("pil", PIL_EXTENSIONS),
        ("dicom", DICOM_EXTENSIONS),
        ("nifti", NIFTI_EXTENSIONS),
        ("numpy", NUMPY_EXTENSIONS),
    ):
        if name.endswith(exts):
            return kind
    return None


def _is_dicom(path: Path) -> bool:
    """Whether the file carries the DICOM preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _scale_to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """Keep uint8; stretch anything else from its own finite min..max onto 0..255.

    An image without a single finite value (all NaN or inf) is an error, not a black image.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.size and not np.isfinite(arr).any():
        raise DataError(f"{where}: the image holds no finite value (all NaN or inf)")
    return scale_to_uint8(arr)


def _pil_to_array(im, where: str) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode == "P" or mode == "PA":
        rgb = np.asarray(im.convert("RGB"))
        grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        return rgb[..., 0].copy() if grey else rgb
    if mode == "LA" or mode == "La":
        return np.asarray(im)[..., 0].copy()  # drop alpha
    if mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_uint8(np.asarray(im), where)
    raise DataError(f"{where}: unsupported image mode {mode!r}")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    where = str(path)
    try:
        with Image.open(path) as im:
            if im.format == "TIFF" and getattr(im, "n_frames", 1) > 1:
                raise DataError(f"{where}: a TIFF with {im.n_frames} pages; expected one image")
            im.load()
            return _pil_to_array(im, where)
    except DataError:
        raise
    except UnidentifiedImageError as e:
        raise DataError(
            f"{where}: not a readable image (corrupt or not really {path.suffix})"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: corrupt image ({type(e).__name__}: {e})") from e


def _read_numpy(path: Path) -> np.ndarray:
    where = str(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{where}: not a readable .npy array ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ):
        raise DataError(
            f"{where}: expected a numeric array, got {getattr(arr, 'dtype', type(arr))}"
        )
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    return _scale_to_uint8(arr, where)


def read_image_file(
    path: str | Path, *, slice: int | None = None, window: Window = None
) -> np.ndarray:
    """Read one image file as uint8 (H,W) grey or (H,W,3) RGB, by its extension.

    PNG/JPEG/BMP/TIFF via Pillow (16-bit and float grey stretched from the image's own min..max
    to 8 bits; palette, CMYK and alpha images become RGB or grey with alpha dropped); ``.dcm``
    (or any file with the DICOM preamble) via :func:`read_dicom`, ``slice`` picking the frame of a
    multi-frame file; ``.nii``/``.nii.gz`` via the middle axial slice or ``slice``; ``.npy``
    channels-last arrays. ``window`` goes to the DICOM ((center, width)) or NIfTI ((low, high))
    reader; a CT preset name works for both.
    """
    p = Path(path).expanduser()
    where = str(path)
    if not p.is_file():
        raise DataError(f"{where}: no such image file")
    kind = _kind(p)
    if kind is None and _is_dicom(p):
        kind = "dicom"
    if slice is not None and kind not in ("dicom", "nifti"):
        raise DataError(f"{where}: a slice ({slice}) only applies to NIfTI and multi-frame DICOM")
    if kind == "pil":
        img = _read_pil(p)
    elif kind == "dicom":
        img = read_dicom(p, window=window, frame=slice)
    elif kind == "nifti":
        img = read_nifti_slices(
            p,
            slices="middle" if slice is None else slice,
            window="percentile" if window is None else window,
        )[0]
    elif kind == "numpy":
        img = _read_numpy(p)
    else:
        raise DataError(
            f"{where}: unsupported file type; readable: {', '.join(IMAGE_EXTENSIONS)} "
            "and DICOM files without an extension"
        )
    return check_image(img, where)


class SlicedFileSource(FileSource):
    """Files read lazily with a per-image slice (NIfTI slice or DICOM frame) where given."""

    def __init__(
        self, paths: Sequence[str], slices: Sequence[int | None], window: Window = None
    ) -> None:
        super().__init__(paths, partial(read_image_file, window=window))
        self.slices = list(slices)
        self.window = window

    def load(self, i: int) -> np.ndarray:
        where = self.describe(i)
        try:
            img = read_image_file(self.paths[i], slice=self.slices[i], window=self.window)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read image {where!r}: {type(e).__name__}: {e}") from e
        return check_image(img, where)

    def describe(self, i: int) -> str:
        k = self.slices[i]
        return self.paths[i] if k is None else f"{self.paths[i]} (slice {k})"

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(repr(self.slices).encode())
        return h.hexdigest()


def image_source(
    paths: Sequence[str], slices: Sequence[int | None] | None, window: Window = None
) -> FileSource:
    """Image files read lazily, with a slice (NIfTI) or frame (DICOM) per file where given."""
    if slices is not None and any(k is not None for k in slices):
        return SlicedFileSource(paths, slices, window)
    return FileSource(paths, partial(read_image_file, window=window))


def _default_task(task: Task | None, k: int) -> Task:
    return task or ("binary" if k == 2 else "multiclass")


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and _kind(p) is not None
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_image_folder(
    root: str | Path,
    class_names: Sequence[str] | None = None,
    modality: str = "unknown",
    *,
    task: Task | None = None,
    window: Window = None,
    name: str | None = None,
) -> ClinicalDataset:
    """Read ``root/<class>/*`` or ``root/<split>/<class>/*`` (split: train/val/test) images.

    Classes are the folder names, sorted, unless ``class_names`` gives them (and their order:
    with two classes the task is binary and ``class_names[1]`` the positive one). Files are
    found recursively by extension (:data:`IMAGE_EXTENSIONS`); hidden files are skipped.
    Images are read lazily; an empty class or split folder is an error.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise DataError(
            f"{root}: no class folders; expected root/<class>/<images> or "
            "root/<split>/<class>/<images>"
        )
    is_split = [d.name.lower() in SPLIT_ALIASES for d in subdirs]
    if any(is_split) and not all(is_split):
        raise DataError(
            f"{root}: mixes split folders ({', '.join(d.name for d, s in zip(subdirs, is_split, strict=True) if s)}) "
            f"with other folders ({', '.join(d.name for d, s in zip(subdirs, is_split, strict=True) if not s)}); "
            "use root/<class>/* or root/<split>/<class>/*"
        )
    groups: list[tuple[str | None, Path]] = []
    if all(is_split):
        for split_dir in subdirs:
            class_dirs = sorted(
                d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
            )
            if not class_dirs:
                raise DataError(
                    f"{split_dir}: the split folder is empty; expected <class>/ folders"
                )
            groups += [(SPLIT_ALIASES[split_dir.name.lower()], d) for d in class_dirs]
    else:
        groups = [(None, d) for d in subdirs]
    found = sorted({d.name for _, d in groups})
    if class_names is None:
        names = found
    else:
        names = [str(c) for c in class_names]
        unknown = [c for c in found if c not in names]
        if unknown:
            raise DataError(f"{root}: folders {unknown} are not among the classes {names}")
        absent = [c for c in names if c not in found]
        if absent:
            raise DataError(f"{root}: classes {absent} have no folder, so no images")
    paths: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    for split, d in groups:
        files = _list_images(d)
        if not files:
            raise DataError(
                f"{d}: the class folder has no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += [str(f) for f in files]
        labels += [names.index(d.name)] * len(files)
        splits += [split or ""] * len(files)
    metadata = {"split": np.array(splits)} if all(is_split) else {}
    return ClinicalDataset(
        name=name or root.name,
        source=FileSource(paths, partial(read_image_file, window=window)),
        labels=np.array(labels, dtype=np.int64),
        class_names=names,
        task=_default_task(task, len(names)),
        modality=modality,
        metadata=metadata,
    )


def same_but_for_case(names: list[str]) -> tuple[str, str] | None:
    """The first two class names that differ only in case ('Pneumonia', 'pneumonia'): almost
    always one class written two ways, which would split it silently into two classes."""
    seen: dict[str, str] = {}
    for n in names:
        other = seen.setdefault(n.casefold(), n)
        if other != n:
            return other, n
    return None


def load_manifest(
    csv_path: str | Path,
    path_col: str = "path",
    label_col: str | None = "label",
    class_names: Sequence[str] | None = None,
    modality: str = "unknown",
    root: str | Path | None = None,
    multilabel_sep: str | None = None,
    *,
    task: Task | None = None,
    window: Window = None,
    name: str | None = None,
) -> ClinicalDataset:
    """Read a CSV manifest: one row per image with its path, label and optional metadata.

    Paths are relative to ``root`` (default: the CSV's folder) unless absolute. Labels are class
    names or integer indices (several per cell with ``multilabel_sep``, which makes the task
    multi-label; an empty cell then means no positive class); ``label_col=None`` reads unlabelled
    images under the placeholder class ``"unlabelled"``. Metadata columns map to the canonical
    keys (``site`` -> ``domain``, ``patient`` -> ``patient_id``, ... see :data:`META_ALIASES`);
    every other column is kept under its own name. A ``slice`` column picks NIfTI slices or
    DICOM frames. Files must exist now; they are decoded (and checked) when read.
    """
    if multilabel_sep is not None and not str(multilabel_sep).strip():
        raise ConfigError(
            f"multilabel_sep={multilabel_sep!r}: give the character between labels, e.g. ';' "
            """(YAML reads a bare | as an empty text block: write -o 'data_options.multilabel_sep="|"')"""
        )
    required = [c for c in (path_col, label_col) if c is not None]
    table = ManifestTable.read(csv_path, required, "choose others with path_col=/label_col=")
    csv_path, where, rows, at = table.path, str(table.path), table.rows, table.at

    def cell(row: dict, col: str) -> str:
        return (row.get(col) or "").strip()

    # paths: resolved eagerly, existence and duplicates checked now
    base = Path(root).expanduser() if root is not None else csv_path.parent
    has_slice = table.has("slice")
    slices = table.slices() if has_slice else [None] * len(table)
    paths = table.paths(path_col, base, slices)

    # labels
    names = [str(c) for c in class_names] if class_names is not None else None
    notes: list[str] = []
    by_value: dict[int, int] | None = None
    if label_col is None:
        if multilabel_sep is not None:
            raise DataError(f"{where}: multilabel_sep needs a label column")
        names = names or ["unlabelled"]
        labels = np.zeros(len(rows), dtype=np.int64)
    else:
        if multilabel_sep is not None:
            cells = [
                [t.strip() for t in cell(r, label_col).split(multilabel_sep) if t.strip()]
                for r in rows
            ]
        else:
            cells = []
            for i, r in enumerate(rows):
                if not cell(r, label_col):
                    raise DataError(f"{at(i)} has no label in column {label_col!r}")
                cells.append([cell(r, label_col)])
        if names is None:
            values = {t for c in cells for t in c}
            if not values:
                raise DataError(f"{where}: column {label_col!r} holds no labels")
            ints = {t: as_index(t) for t in values}
            words = sorted(t for t, v in ints.items() if v is None)
            if not words:
                present = sorted({v for v in ints.values() if v is not None})
                if present[0] < 0:
                    raise DataError(f"{where}: negative class index {present[0]}")
                # the classes are the integers present: {0, 5} is binary, not 6 classes
                names, by_value = integer_classes(present, where, notes)
            elif len(words) < len(values):
                nums = sorted(t for t, v in ints.items() if v is not None)
                raise DataError(
                    f"{where}: labels in {label_col!r} mix class names ({', '.join(map(repr, words[:5]))}) "
                    f"and integers ({', '.join(map(repr, nums[:5]))}); pass class_names= to say "
                    "which classes the integers index"
                )
            else:
                names = words
                same = same_but_for_case(names)
                if same:
                    raise DataError(
                        f"{where}: labels {same[0]!r} and {same[1]!r} in {label_col!r} differ only "
                        "in case, so they would be two classes; write each class one way"
                    )
        lookup = {n: j for j, n in enumerate(names)}

        def index(i: int, text: str) -> int:
            if text in lookup:
                return lookup[text]
            j = as_index(text)
            if by_value is not None:  # integer labels: "05" is class 5
                j = by_value.get(j, -1) if j is not None else None
            if j is not None and 0 <= j < len(names):
                return j
            raise DataError(
                f"{at(i)}: unknown label {text!r} in column {label_col!r}; the classes are {names} "
                f"(or their indices 0..{len(names) - 1})"
            )

        if multilabel_sep is not None:
            labels = np.zeros((len(rows), len(names)), dtype=np.int64)
            for i, c in enumerate(cells):
                for t in c:
                    labels[i, index(i, t)] = 1
        else:
            labels = np.array([index(i, c[0]) for i, c in enumerate(cells)], dtype=np.int64)
    if multilabel_sep is not None:
        if task not in (None, "multilabel"):
            raise DataError(f"{where}: multilabel_sep makes the task multilabel, not {task!r}")
        task = "multilabel"
    elif task == "multilabel":
        raise DataError(f"{where}: a multilabel task needs multilabel_sep (the label separator)")

    # metadata
    metadata = table.metadata({path_col} | ({label_col} if label_col else set()))

    ds_name = name or (csv_path.parent.name if csv_path.stem == "manifest" else csv_path.stem)
    source = image_source(paths, slices if has_slice else None, window)
    return ClinicalDataset(
        name=ds_name,
        source=source,
        labels=labels,
        class_names=names,
        task=_default_task(task, len(names)),
        modality=modality,
        metadata=metadata,
        notes=notes,
    )
