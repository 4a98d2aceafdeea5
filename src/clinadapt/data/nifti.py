"""NIfTI volumes read as 2D uint8 slices, in canonical (RAS+) orientation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clinadapt.data.base import ArraySource, ClinicalDataset, Task, integer_classes
from clinadapt.data.dicom import CT_WINDOWS, scale_to_uint8
from clinadapt.errors import DataError

Slices = str | int | Sequence[int]
IntensityWindow = tuple[float, float] | str | None
PERCENTILES = (0.5, 99.5)


class _SliceSource(ArraySource):
    """Slices of one volume, named by file and slice number in error messages."""

    def __init__(self, array: np.ndarray, origin: str, positions: Sequence[int], axis: int) -> None:
        super().__init__(array, origin=origin)
        self.positions = list(positions)
        self.axis = axis

    def describe(self, i: int) -> str:
        return f"{self.origin} (axis {self.axis}, slice {self.positions[i]})"


def nifti_stem(path: str | Path) -> str:
    """The file name without ``.nii`` or ``.nii.gz``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


# The last volume read and its intensity statistics: a manifest that lists many slices of one
# file then decodes it once, not once per slice.
_LAST: dict[tuple, tuple[np.ndarray, dict]] = {}


def _cached_volume(path: str | Path, volume: int | None) -> tuple[np.ndarray, dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such NIfTI file")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, volume)
    hit = _LAST.get(key)
    if hit is None:
        data, zooms = _read_volume(path, volume)
        data.flags.writeable = False
        _LAST.clear()
        hit = _LAST[key] = (data, {"zooms": zooms})
    return hit


def load_nifti_array(path: str | Path, volume: int | None = None) -> np.ndarray:
    """The (X,Y,Z) float32 volume in RAS+ orientation (read-only); 4D gives time point ``volume``
    (required when the file holds more than one)."""
    return _cached_volume(path, volume)[0]


def nifti_plane_spacing(
    path: str | Path, axis: int = 2, volume: int | None = None
) -> tuple[float, float]:
    """Millimetres per pixel (row, col) of the slices :func:`read_nifti_slices` returns.

    A slice is ``np.rot90`` of the canonical plane, so its rows run along the second remaining
    axis and its columns along the first.
    """
    zooms = _cached_volume(path, volume)[1]["zooms"]
    a, b = (k for k in (0, 1, 2) if k != axis)
    return float(zooms[b]), float(zooms[a])


def _read_volume(path: str | Path, volume: int | None) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    where = str(path)
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise DataError(f"{where}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    shape = img.shape
    if len(shape) == 2:  # a single 2D image stored as NIfTI
        shape = (*shape, 1)
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] < 1):
        raise DataError(
            f"{where}: a NIfTI of shape {img.shape}; expected 3D (X,Y,Z) or 4D (X,Y,Z,T)"
        )
    if volume is None:  # a time series or multi-volume file: which volume is the user's call
        if len(shape) == 4 and shape[3] > 1:
            raise DataError(
                f"{where}: a 4D NIfTI with {shape[3]} volumes (shape {img.shape}); clinadapt "
                "reads one 3D volume: pass volume=k (0..{}) to read that one, or split the "
                "file".format(shape[3] - 1)
            )
        volume = 0
    if len(shape) == 4 and not 0 <= volume < shape[3]:
        raise DataError(
            f"{where}: volume {volume} is out of range; the file has {shape[3]} time points"
        )
    try:
        img = nib.as_closest_canonical(img)
        if len(img.shape) == 4:
            data = np.asarray(img.dataobj[..., volume], dtype=np.float32)
        else:
            data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise DataError(f"{where}: cannot read the NIfTI voxels ({type(e).__name__}: {e})") from e
    if data.ndim == 2:
        data = data[..., None]
    if data.size == 0:
        raise DataError(f"{where}: the NIfTI volume is empty ({data.shape})")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))
    return data, tuple(z if z > 0 else 1.0 for z in zooms)


def _intensity_range(
    data: np.ndarray, window: IntensityWindow, where: str, stats: dict
) -> tuple[float, float]:
    if window is None or (isinstance(window, str) and window in ("minmax", "percentile")):
        if "minmax" not in stats:
            finite = data[np.isfinite(data)]
            if finite.size == 0:
                raise DataError(f"{where}: the NIfTI volume holds no finite values")
            stats["minmax"] = float(finite.min()), float(finite.max())
            stats["percentile"] = tuple(float(v) for v in np.percentile(finite, PERCENTILES))
        return stats["percentile" if window == "percentile" else "minmax"]
    if isinstance(window, str):
        if window in CT_WINDOWS:
            c, w = CT_WINDOWS[window]
            return c - w / 2, c + w / 2
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
    return lo, hi


def _slice_positions(slices: Slices, n: int, axis: int, where: str) -> list[int]:
    if isinstance(slices, str):
        if slices == "middle":
            return [n // 2]
        if slices == "all":
            return list(range(n))
        raise DataError(
            f"{where}: slices must be 'middle', 'all', an int or a list, got {slices!r}"
        )
    picks = [slices] if isinstance(slices, int | np.integer) else list(slices)
    if not picks:
        raise DataError(f"{where}: no slices asked for")
    for k in picks:
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 0 <= k < n:
            raise DataError(
                f"{where}: slice {k!r} is out of range; axis {axis} has {n} slices (0..{n - 1})"
            )
    return [int(k) for k in picks]


def _planes(
    path: str | Path, axis: int, slices: Slices, volume: int | None
) -> tuple[list[int], np.ndarray, dict]:
    """The slice positions asked for, the volume and its statistics."""
    if axis not in (0, 1, 2):
        raise DataError(f"{path}: axis must be 0, 1 or 2, got {axis!r}")
    data, stats = _cached_volume(path, volume)
    return _slice_positions(slices, data.shape[axis], axis, str(path)), data, stats


def read_nifti_planes(
    path: str | Path, axis: int, slices: Slices, window: IntensityWindow, volume: int | None = None
) -> tuple[list[int], list[np.ndarray]]:
    """Slice positions and uint8 slices, as :func:`read_nifti_slices` reads them."""
    positions, data, stats = _planes(path, axis, slices, volume)
    lo, hi = _intensity_range(data, window, str(path), stats)
    out = []
    for k in positions:
        plane = scale_to_uint8(np.take(data, k, axis=axis), lo, hi)
        out.append(np.ascontiguousarray(np.rot90(plane)))
    return positions, out


def read_nifti_slices(
    path: str | Path,
    axis: int = 2,
    slices: Slices = "middle",
    window: IntensityWindow = "percentile",
    *,
    volume: int | None = None,
) -> list[np.ndarray]:
    """Read 2D uint8 slices of a NIfTI volume along ``axis`` of its RAS+ orientation.

    ``axis`` 0/1/2 gives sagittal/coronal/axial slices; each slice is ``np.rot90`` of the
    canonical array's plane, so anterior (axial) or superior (sagittal, coronal) is at the top.
    A 4D file (X,Y,Z,T) is read at time point ``volume``, which must be given when T > 1. Intensities map onto
    0..255 by one range for the whole volume: ``"percentile"`` (0.5-99.5th percentiles, the
    default), ``(low, high)``, ``"minmax"``/``None`` (full range), or a CT preset name.
    """
    return read_nifti_planes(path, axis, slices, window, volume)[1]


def read_nifti_labels(
    path: str | Path, axis: int = 2, slices: Slices = "all", *, volume: int | None = None
) -> tuple[list[int], list[np.ndarray]]:
    """Slice positions and the raw (unscaled) values of each slice, oriented as the images."""
    positions, data, _ = _planes(path, axis, slices, volume)
    return positions, [np.ascontiguousarray(np.rot90(np.take(data, k, axis))) for k in positions]


def _label_index(value: int | str, names: list[str], where: str, row: int) -> int:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if 0 <= value < len(names):
            return int(value)
    elif str(value) in names:
        return names.index(str(value))
    raise DataError(f"{where}: slice label #{row} {value!r} is not one of the classes {names}")


def load_nifti_volume(
    path: str | Path,
    axis: int = 2,
    slices: Slices = "all",
    label: int | str | Sequence[int | str] | None = None,
    class_names: Sequence[str] | None = None,
    window: IntensityWindow = "percentile",
    *,
    volume: int | None = None,
    modality: str = "unknown",
    task: Task | None = None,
    metadata: Mapping[str, str] | None = None,
    name: str | None = None,
) -> ClinicalDataset:
    """One dataset image per slice of a NIfTI volume, with ``patient_id`` (file stem) and ``slice``.

    ``label`` is one label for every slice or one per slice (class names or indices into
    ``class_names``); an unlabelled volume gets the single placeholder class ``"unlabelled"``.
    ``metadata`` adds constant values, e.g. ``{"domain": "site-a", "split": "test"}``. The task
    is binary for two classes (positive = ``class_names[1]``) unless given.
    """
    where = str(path)
    positions, imgs = read_nifti_planes(path, axis, slices, window, volume)
    n = len(imgs)
    notes: list[str] = []
    names = [str(c) for c in class_names] if class_names is not None else None
    if label is None:
        names = names or ["unlabelled"]
        labels = np.zeros(n, dtype=np.int64)
    else:
        raw = [label] * n if isinstance(label, int | str | np.integer) else list(label)
        if len(raw) != n:
            raise DataError(f"{where}: {len(raw)} labels for {n} slices")
        if names is None and all(isinstance(v, int | np.integer) for v in raw):
            # the classes are the integers present: {0, 5} is binary, not 6 classes
            names, by_value = integer_classes(sorted({int(v) for v in raw}), where, notes)
            raw = [by_value[int(v)] for v in raw]
        elif names is None:
            names = sorted({str(v) for v in raw})
        labels = np.array([_label_index(v, names, where, i) for i, v in enumerate(raw)])
    meta = {
        "patient_id": np.full(n, nifti_stem(path)),
        "slice": np.array([str(k) for k in positions]),
    }
    for key, value in (metadata or {}).items():
        meta[key] = np.full(n, str(value))
    return ClinicalDataset(
        name=name or nifti_stem(path),
        source=_SliceSource(np.stack(imgs), where, positions, axis),
        labels=labels,
        class_names=names,
        task=task or ("binary" if len(names) == 2 else "multiclass"),
        modality=modality,
        metadata=meta,
        notes=notes,
    )
