"""Reading volumes: NIfTI files and DICOM series into RAS+ float volumes, with label volumes.

Every volume goes through the same MONAI steps: ``Orientation("RAS")``, ``Spacing`` to a target
voxel size when one is given (trilinear for intensities, nearest for labels), the intensity
window (``ScaleIntensityRange`` for a CT window in HU or a fixed range,
``ScaleIntensityRangePercentiles`` 0.5-99.5 for MRI and unknown modalities: the rule nnU-Net and
MedSAM use), then an optional crop: ``CropForeground`` around the body and/or
``ResizeWithPadOrCrop`` to a fixed size. A label volume must lie on its image's grid (same
shape and voxel-to-world affine) and takes the same spatial steps.

Refused with a :class:`DataError` naming the file: a NIfTI without orientation (qform and sform
codes both 0: the affine is unknown, so "RAS" would be a guess), a 4D file unless ``volume=k``
picks one of its volumes, a DICOM series whose slices lack position or orientation, mixed series
in one folder, and a label volume that is not on its image's grid.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.data.dicom import CT_WINDOWS
from clinadapt.data.nifti import nifti_stem
from clinadapt.errors import DataError

Window = tuple[float, float] | str | None
PERCENTILES = (0.5, 99.5)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# How far two affines may differ (mm, and in the direction cosines) and still be one grid.
AFFINE_TOLERANCE = 1e-3
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MONAI's readers warn about optional decoders and changed defaults on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class VolumeSettings:
    """How a reader turns a file into a model-ready volume; part of the dataset fingerprint."""

    spacing: tuple[float, float, float] | None = None  # target mm per voxel; None: keep native
    window: Window = "percentile"
    size: tuple[int, int, int] | None = None  # centre pad/crop to this shape after resampling
    crop_foreground: bool = False  # crop to the bounding box of voxels above the window's low end
    volume: int | None = None  # which volume of a 4D file

    def describe(self) -> str:
        return repr(self)


@dataclass
class Volume:
    """A read volume: float32 (X,Y,Z) in [0, 1] (RAS+), its spacing and affine after the steps."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    native_shape: tuple[int, ...]
    native_spacing: tuple[float, float, float]
    where: str


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom_series(path: str | Path) -> bool:
    """A folder holding DICOM files (``*.dcm``, or files with the DICM preamble)."""
    p = Path(path)
    return p.is_dir() and any(_is_dicom_file(f) for f in _files(p))


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _is_dicom_file(f: Path) -> bool:
    if f.suffix.lower() == ".dcm":
        return True
    try:
        with open(f, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def parse_window(window: Window, where: str) -> tuple[str, tuple[float, float] | None]:
    """("percentile"|"minmax"|"range", (low, high) for a range) from a window argument."""
    if window is None or window == "minmax":
        return "minmax", None
    if window == "percentile":
        return "percentile", None
    if isinstance(window, str):
        if window in CT_WINDOWS:
            c, w = CT_WINDOWS[window]
            return "range", (c - w / 2, c + w / 2)
        raise DataError(
            f"{where}: unknown window {window!r}; use (low, high), 'percentile', 'minmax', None or "
            f"a CT preset ({', '.join(CT_WINDOWS)})"
        )
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: window must be (low, high) or a name, got {window!r}") from e
    if not hi > lo:
        raise DataError(f"{where}: window (low, high) needs high > low, got {window!r}")
    return "range", (lo, hi)


def triple(value: Any, what: str, where: str) -> tuple[float, float, float] | None:
    """``1.5`` or ``[1, 1, 2.5]`` -> a 3-tuple of positive numbers (None stays None)."""
    if value is None:
        return None
    vals = [value] * 3 if isinstance(value, int | float) else list(value)
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(v > 0 for v in out):
        raise DataError(f"{where}: {what} must be a positive number or three, got {value!r}")
    return out  # type: ignore[return-value]


# --- raw reading: array + affine in file order ----------------------------------------------


def _read_nifti(path: Path, volume: int | None) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    where = str(path)
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise DataError(f"{where}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    header = img.header
    codes = (int(header.get("qform_code", 0)), int(header.get("sform_code", 0)))
    if hasattr(header, "get_qform") and codes == (0, 0):
        raise DataError(
            f"{where}: the NIfTI header has no orientation (qform_code and sform_code are both "
            "0), so the voxel-to-world affine is unknown and the volume cannot be put in RAS+ "
            "orientation; fix the header (e.g. nibabel's set_qform) or convert it from DICOM again"
        )
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        if volume is None:
            raise DataError(
                f"{where}: a 4D NIfTI with {shape[3]} volumes (shape {img.shape}); clinadapt reads "
                f"one 3D volume: pass volume=k (0..{shape[3] - 1}), or split the file"
            )
        if not 0 <= volume < shape[3]:
            raise DataError(
                f"{where}: volume {volume} is out of range; the file has {shape[3]} volumes"
            )
    elif len(shape) != 3:
        raise DataError(
            f"{where}: a NIfTI of shape {img.shape}; a volume needs 3 spatial axes (X,Y,Z)"
        )
    try:
        if len(shape) == 4:
            data = np.asarray(img.dataobj[..., volume], dtype=np.float32)
        else:
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as e:
        raise DataError(f"{where}: cannot read the NIfTI voxels ({type(e).__name__}: {e})") from e
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    where = str(folder)
    files = [f for f in _files(folder) if _is_dicom_file(f)]
    if not files:
        raise DataError(f"{where}: no DICOM files in the folder")
    series: set[str] = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:
            raise DataError(f"{f}: not a readable DICOM file ({type(e).__name__}: {e})") from e
        missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient") if t not in ds]
        if missing:
            raise DataError(
                f"{f}: the slice has no {' or '.join(missing)}, so the series' voxel-to-world "
                "affine is unknown and it cannot be stacked into an oriented volume"
            )
        series.add(str(ds.get("SeriesInstanceUID", "")))
    if len(series) > 1:
        raise DataError(
            f"{where}: the folder mixes {len(series)} DICOM series; put each series in its own "
            "folder"
        )
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    try:
        with _quiet():
            t = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True)(
                str(folder)
            )
    except Exception as e:
        raise DataError(f"{where}: cannot stack the DICOM series ({type(e).__name__}: {e})") from e
    data = np.asarray(t[0], dtype=np.float32)
    if data.ndim != 3:
        raise DataError(f"{where}: the series stacks to shape {data.shape}, not a 3D volume")
    return data, np.asarray(t.affine, dtype=np.float64)


def read_raw(path: str | Path, volume: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The voxels (file order, float32) and voxel-to-world affine of a NIfTI file or DICOM series."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_dicom_series(p)
    if not p.is_file():
        raise DataError(f"{path}: no such volume file or DICOM series folder")
    if is_nifti(p):
        return _read_nifti(p, volume)
    raise DataError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a folder holding a DICOM series")


def _spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


# --- the shared spatial and intensity steps (MONAI) -------------------------------------------


def _meta(data: np.ndarray, affine: np.ndarray) -> Any:
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(data)[None], affine=torch.as_tensor(affine))


def _spatial(x: Any, settings: VolumeSettings, label: bool) -> Any:
    from monai.transforms import Orientation, Spacing

    with _quiet():
        x = Orientation(axcodes="RAS", labels=_RAS_LABELS)(x)
        if settings.spacing is not None:
            mode = "nearest" if label else "bilinear"
            x = Spacing(pixdim=settings.spacing, mode=mode, padding_mode="border")(x)
    return x


def _intensity(x: Any, window: Window, where: str) -> Any:
    from monai.transforms import ScaleIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

    kind, rng = parse_window(window, where)
    if kind == "percentile":
        t = ScaleIntensityRangePercentiles(*PERCENTILES, b_min=0.0, b_max=1.0, clip=True)
    elif kind == "range":
        assert rng is not None
        t = ScaleIntensityRange(a_min=rng[0], a_max=rng[1], b_min=0.0, b_max=1.0, clip=True)
    else:
        t = ScaleIntensity(minv=0.0, maxv=1.0)
    return t(x)


def _crop_box(image01: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    """The bounding box (with ``margin`` voxels) of voxels above 0 in a [0,1] volume (MONAI's
    ``CropForeground`` rule); the whole volume when nothing is above 0."""
    from monai.transforms.utils import generate_spatial_bounding_box

    start, end = generate_spatial_bounding_box(image01[None], lambda v: v > 0, margin=margin)
    if any(e <= s for s, e in zip(start, end, strict=True)):
        return (slice(None),) * 3  # type: ignore[return-value]
    return tuple(slice(s, e) for s, e in zip(start, end, strict=True))  # type: ignore[return-value]


def _fit_size(arr: np.ndarray, size: tuple[int, int, int] | None) -> np.ndarray:
    if size is None:
        return arr
    from monai.transforms import ResizeWithPadOrCrop

    return np.asarray(ResizeWithPadOrCrop(spatial_size=size)(arr[None])[0])


@dataclass
class _Grid:
    """What a label volume must match, and the crop its image took."""

    native_shape: tuple[int, ...]
    native_affine: np.ndarray
    box: tuple[slice, slice, slice]


def read_volume(path: str | Path, settings: VolumeSettings | None = None) -> Volume:
    """Read one volume (NIfTI file or DICOM series folder) through the MONAI steps of the module."""
    return _read_with_grid(path, settings or VolumeSettings())[0]


def _read_with_grid(path: str | Path, settings: VolumeSettings) -> tuple[Volume, _Grid]:
    where = str(path)
    data, affine = read_raw(path, settings.volume)
    x = _spatial(_meta(data, affine), settings, label=False)
    x = _intensity(x, settings.window, where)
    arr = np.asarray(x[0], dtype=np.float32)
    out_affine = np.asarray(x.affine, dtype=np.float64)
    box = _crop_box(arr) if settings.crop_foreground else (slice(None),) * 3
    arr = _fit_size(arr[box], settings.size)
    vol = Volume(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        spacing=_spacing_of(out_affine),
        affine=out_affine,
        native_shape=tuple(data.shape),
        native_spacing=_spacing_of(affine),
        where=where,
    )
    return vol, _Grid(tuple(data.shape), affine, box)  # type: ignore[arg-type]


def _read_labels(path: str | Path, grid: _Grid, image: str, settings: VolumeSettings) -> np.ndarray:
    """A label volume on ``grid`` taken through the same spatial steps (nearest neighbour)."""
    from clinadapt.data.segmentation import integer_mask

    where = str(path)
    data, affine = read_raw(path, None)
    if data.shape != grid.native_shape:
        raise DataError(
            f"{where}: the label volume is {'x'.join(map(str, data.shape))} but its image "
            f"{image} is {'x'.join(map(str, grid.native_shape))}; they must share one voxel grid"
        )
    if not np.allclose(affine, grid.native_affine, atol=AFFINE_TOLERANCE):
        raise DataError(
            f"{where}: the label volume's voxel-to-world affine differs from its image {image}'s "
            f"(spacing {_fmt(_spacing_of(affine))} vs {_fmt(_spacing_of(grid.native_affine))} mm, "
            f"origin {_fmt(affine[:3, 3])} vs {_fmt(grid.native_affine[:3, 3])}); the labels are "
            "not on the image's grid"
        )
    data = integer_mask(data, where).astype(np.float32)
    x = _spatial(_meta(data, affine), settings, label=True)
    arr = np.rint(np.asarray(x[0])).astype(np.int64)
    return _fit_size(arr[grid.box], settings.size)


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


# --- datasets -------------------------------------------------------------------------------


def _settings(
    spacing: Any, window: Window, size: Any, crop_foreground: bool, volume: int | None, where: str
) -> VolumeSettings:
    parse_window(window, where)
    target = triple(spacing, "spacing", where)
    shape = triple(size, "size", where)
    return VolumeSettings(
        spacing=target,
        window=tuple(window) if isinstance(window, list) else window,  # type: ignore[arg-type]
        size=None if shape is None else tuple(int(v) for v in shape),  # type: ignore[arg-type]
        crop_foreground=bool(crop_foreground),
        volume=volume,
    )


def _reader(settings: VolumeSettings):
    def read(path: str) -> np.ndarray:
        return read_volume(path, settings).array

    return read


def load_volume_dataset(
    path: str | Path,
    *,
    labels: str | Path | None = None,
    label: int | str | None = None,
    class_names: Sequence[str] | None = None,
    label_map: Mapping[int, str] | Sequence[str] | None = None,
    spacing: float | Sequence[float] | None = None,
    window: Window = "percentile",
    size: int | Sequence[int] | None = None,
    crop_foreground: bool = False,
    volume: int | None = None,
    modality: str = "unknown",
    metadata: Mapping[str, str] | None = None,
    path_col: str = "path",
    label_col: str = "label",
    mask_col: str = "mask",
    name: str | None = None,
    cache_bytes: int = 1 << 30,
    volumes: bool = True,
) -> Any:
    """Volumes from a NIfTI file, a DICOM series folder, a CSV manifest or an nnU-Net/MSD folder.

    - one file or series: one volume; ``labels=`` its label volume (segmentation) or ``label=``
      its class (classification);
    - a ``.csv`` with a ``path`` column (NIfTI file or series folder, relative to the CSV) and a
      ``label`` column (classification) and/or a ``mask`` column (label volumes: segmentation);
      other columns are metadata (split, domain/site, scanner, sex, age_group, patient_id);
    - a folder with ``imagesTr``/``labelsTr`` (nnU-Net, Medical Segmentation Decathlon) or
      ``images``/``labels``: segmentation; label names and modality from its ``dataset.json``.

    ``spacing`` resamples to that voxel size (mm), ``window`` maps intensities onto [0, 1] (CT
    preset, (low, high), "percentile" or "minmax"), ``crop_foreground`` and ``size`` crop.
    ``volumes`` is the option that chose this reader in ``load_dataset`` (always true here).
    """
    p = Path(path).expanduser()
    where = str(p)
    settings = _settings(spacing, window, size, crop_foreground, volume, where)
    if p.is_dir() and not is_dicom_series(p):
        return _load_folder(
            p, settings, class_names, label_map, modality, metadata, name, cache_bytes
        )
    if p.suffix.lower() == ".csv":
        return _load_manifest(
            p,
            settings,
            class_names,
            label_map,
            modality,
            (path_col, label_col, mask_col),
            name,
            cache_bytes,
        )
    stem = nifti_stem(p) if is_nifti(p) else p.name
    meta = {"patient_id": [stem], **{k: [str(v)] for k, v in (metadata or {}).items()}}
    if labels is not None:
        return _segmentation(
            [str(p)],
            [str(labels)],
            settings,
            class_names,
            label_map,
            modality,
            meta,
            name or stem,
            cache_bytes,
        )
    return _classification(
        [str(p)], [label], settings, class_names, modality, meta, name or stem, where, cache_bytes
    )


def _classification(
    paths: list[str],
    raw_labels: list[Any],
    settings: VolumeSettings,
    class_names: Sequence[str] | None,
    modality: str,
    meta: Mapping[str, Sequence[str]],
    name: str,
    where: str,
    cache_bytes: int = 1 << 30,
) -> Any:
    from clinadapt.data.base import integer_classes
    from clinadapt.data.volume import FileVolumes, VolumeDataset

    notes: list[str] = []
    names = [str(c) for c in class_names] if class_names is not None else None
    if all(v is None or v == "" for v in raw_labels):
        names = names or ["unlabelled"]
        labels = np.zeros(len(paths), dtype=np.int64)
    else:
        if any(v is None or v == "" for v in raw_labels):
            row = next(i for i, v in enumerate(raw_labels) if v is None or v == "")
            raise DataError(f"{where}: volume #{row + 1} ({paths[row]}) has no label")
        ints = [_as_int(v) for v in raw_labels]
        if names is None and all(v is not None for v in ints):
            names, lookup = integer_classes(sorted(set(ints)), where, notes)  # type: ignore[arg-type]
            labels = np.array([lookup[v] for v in ints])
        else:
            names = names or sorted({str(v) for v in raw_labels})
            labels = np.array([_class_index(v, names, where, i) for i, v in enumerate(raw_labels)])
    source = FileVolumes(paths, _reader(settings), settings.describe(), cache_bytes)
    spacing = np.array([_target_spacing(p, settings) for p in paths])
    return VolumeDataset(
        name=name,
        source=source,
        labels=labels,
        class_names=names,
        task="binary" if len(names) == 2 else "multiclass",
        modality=modality,
        metadata={k: np.asarray(v) for k, v in meta.items()},
        spacing=spacing,
        spacing_origin="file header" if settings.spacing is None else "resampled",
        notes=notes,
    )


def _as_int(v: Any) -> int | None:
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _class_index(value: Any, names: list[str], where: str, row: int) -> int:
    v = _as_int(value)
    if str(value) in names:
        return names.index(str(value))
    if v is not None and 0 <= v < len(names):
        return v
    raise DataError(f"{where}: label #{row + 1} {value!r} is not one of the classes {names}")


def read_affine(path: str | Path) -> np.ndarray:
    """The voxel-to-world affine of a NIfTI file (header only) or a DICOM series."""
    p = Path(path).expanduser()
    if p.is_file() and is_nifti(p):
        import nibabel as nib

        try:
            return np.asarray(nib.load(str(p)).affine, dtype=np.float64)
        except Exception as e:
            raise DataError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    return read_raw(p)[1]


def _target_spacing(path: str, settings: VolumeSettings) -> tuple[float, float, float]:
    """The spacing of the read volume: the target, else the header's in RAS+ axis order."""
    if settings.spacing is not None:
        return settings.spacing
    affine = read_affine(path)
    canon = _spatial(_meta(np.zeros((1, 1, 1), np.float32), affine), settings, label=False)
    return _spacing_of(np.asarray(canon.affine))


def _segmentation(
    paths: list[str],
    label_paths: list[str],
    settings: VolumeSettings,
    class_names: Sequence[str] | None,
    label_map: Mapping[int, str] | Sequence[str] | None,
    modality: str,
    meta: Mapping[str, Sequence[str]],
    name: str,
    cache_bytes: int = 1 << 30,
) -> Any:
    """Read and check every label volume once (classes, voxel counts), then keep them lazily."""
    from clinadapt.data.seg_readers import resolve_classes
    from clinadapt.data.segmentation import to_label_map
    from clinadapt.data.volume import (
        FileVolumeMasks,
        FileVolumes,
        VolumeSegmentationDataset,
        class_voxels,
    )

    grids: list[_Grid] = []
    spacings: list[tuple[float, float, float]] = []
    raw: list[np.ndarray] = []
    for p, lp in zip(paths, label_paths, strict=True):
        vol, grid = _read_with_grid(p, settings)
        grids.append(grid)
        spacings.append(vol.spacing)
        lab = _read_labels(lp, grid, p, settings)
        if lab.shape != vol.array.shape:  # cannot happen through the shared steps; stay safe
            raise DataError(f"{lp}: label volume {lab.shape} vs image {vol.array.shape}")
        raw.append(lab)
    values = set().union(*(np.unique(r).tolist() for r in raw))
    names, lut = resolve_classes(class_names, label_map, values, label_paths[0])
    maps = [to_label_map(r, lut, names, lp) for r, lp in zip(raw, label_paths, strict=True)]
    areas = np.stack([class_voxels(m, len(names)) for m in maps])
    kept = {i: m for i, m in enumerate(maps)} if sum(m.nbytes for m in maps) < (256 << 20) else {}

    def read_mask(i: int) -> np.ndarray:
        if i in kept:
            return kept[i]
        lab = _read_labels(label_paths[i], grids[i], paths[i], settings)
        return to_label_map(lab, lut, names, label_paths[i])

    return VolumeSegmentationDataset(
        name=name,
        source=FileVolumes(paths, _reader(settings), settings.describe(), cache_bytes),
        labels=None,  # type: ignore[arg-type]
        class_names=names,
        modality=modality,
        metadata={k: np.asarray(v) for k, v in meta.items()},
        spacing=np.array(spacings),
        spacing_origin="file header" if settings.spacing is None else "resampled",
        masks=FileVolumeMasks(label_paths, read_mask, len(names), settings.describe() + str(lut)),
        areas=areas,
    )


def _load_manifest(
    csv_path: Path,
    settings: VolumeSettings,
    class_names: Sequence[str] | None,
    label_map: Mapping[int, str] | Sequence[str] | None,
    modality: str,
    columns: tuple[str, str, str],
    name: str | None,
    cache_bytes: int,
) -> Any:
    from clinadapt.data.manifest import ManifestTable

    path_col, label_col, mask_col = columns
    table = ManifestTable.read(csv_path, [path_col], hint="one row per volume")
    base = csv_path.parent
    paths = []
    for i in range(len(table)):
        text = table.cell(i, path_col)
        if not text:
            raise DataError(f"{table.at(i)} has an empty {path_col!r}")
        q = Path(text).expanduser()
        q = q if q.is_absolute() else base / q
        if not (q.is_file() or q.is_dir()):
            raise DataError(f"{table.at(i)}: volume {q} does not exist (relative to {base})")
        paths.append(str(q))
    skip = {path_col, label_col, mask_col}
    meta = table.metadata(skip)
    if "patient_id" not in meta:
        meta["patient_id"] = np.array(
            [nifti_stem(q) if is_nifti(q) else Path(q).name for q in paths]
        )
    title = name or csv_path.stem
    if table.has(mask_col):
        masks = []
        for i in range(len(table)):
            text = table.cell(i, mask_col)
            if not text:
                raise DataError(f"{table.at(i)} has an empty {mask_col!r}")
            q = Path(text).expanduser()
            masks.append(str(q if q.is_absolute() else base / q))
        return _segmentation(
            paths, masks, settings, class_names, label_map, modality, meta, title, cache_bytes
        )
    raw = table.column(label_col) if label_col in table.fields else [None] * len(table)
    return _classification(
        paths, raw, settings, class_names, modality, meta, title, str(csv_path), cache_bytes
    )


def _dataset_json(folder: Path) -> dict[str, Any]:
    f = folder / "dataset.json"
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: not readable JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _labels_from_json(info: Mapping[str, Any]) -> dict[int, str] | None:
    """nnU-Net v2 ``{"background": 0, "liver": 1}`` or MSD ``{"0": "background", "1": "liver"}``."""
    labels = info.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        return None
    out: dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(v, int):
            out[v] = str(k)
        elif str(k).lstrip("-").isdigit():
            out[int(k)] = str(v)
    return {v: ("background" if n.lower() == "background" else n) for v, n in out.items()} or None


def _modality_from_json(info: Mapping[str, Any]) -> str | None:
    chans = info.get("channel_names") or info.get("modality")
    if isinstance(chans, Mapping) and chans:
        first = str(next(iter(chans.values()))).lower()
        return (
            "ct"
            if first == "ct"
            else "mri"
            if first in ("mri", "mr", "t1", "t2", "flair")
            else first
        )
    return None


def _load_folder(
    folder: Path,
    settings: VolumeSettings,
    class_names: Sequence[str] | None,
    label_map: Mapping[int, str] | Sequence[str] | None,
    modality: str,
    metadata: Mapping[str, str] | None,
    name: str | None,
    cache_bytes: int,
) -> Any:
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (folder / img_dir).is_dir() and (folder / lab_dir).is_dir():
            break
    else:
        raise DataError(
            f"{folder}: a volume folder needs imagesTr/ and labelsTr/ (nnU-Net, MSD) or images/ "
            "and labels/ subfolders of NIfTI files; or give a NIfTI file, a DICOM series folder "
            "or a CSV manifest"
        )
    labels = {nifti_stem(f): f for f in _files(folder / lab_dir) if is_nifti(f)}
    images: dict[str, Path] = {}
    for f in _files(folder / img_dir):
        if not is_nifti(f):
            continue
        stem = nifti_stem(f)
        case = stem[:-5] if stem[-5:-4] == "_" and stem[-4:].isdigit() else stem  # case_0000
        if stem != case and not stem.endswith("_0000"):
            raise DataError(
                f"{f}: a second input channel ({stem[-4:]}); clinadapt reads one channel per "
                "volume (the _0000 file)"
            )
        images[case] = f
    cases = sorted(set(images) & set(labels))
    if not cases:
        raise DataError(
            f"{folder}: no image in {img_dir}/ has a label volume of the same case name in "
            f"{lab_dir}/"
        )
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        raise DataError(
            f"{folder}: {len(unmatched)} case(s) have an image or a label volume but not both: "
            f"{', '.join(unmatched[:5])}"
        )
    info = _dataset_json(folder)
    if label_map is None and class_names is None:
        label_map = _labels_from_json(info)
    if modality == "unknown":
        modality = _modality_from_json(info) or modality
    meta = {"patient_id": cases, **{k: [str(v)] * len(cases) for k, v in (metadata or {}).items()}}
    return _segmentation(
        [str(images[c]) for c in cases],
        [str(labels[c]) for c in cases],
        settings,
        class_names,
        label_map,
        modality,
        meta,
        name or folder.name,
        cache_bytes,
    )


__all__ = [
    "PERCENTILES",
    "Volume",
    "VolumeSettings",
    "is_dicom_series",
    "is_nifti",
    "load_volume_dataset",
    "parse_window",
    "read_raw",
    "read_volume",
]
