"""DICOM images as uint8 arrays: rescale to modality units, window, invert MONOCHROME1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import DataError

# (center, width) in Hounsfield units: the usual CT display windows, as listed in Radiopaedia's
# "Windowing (CT)" article (brain W80 L40, lungs W1500 L-600, mediastinum W350 L50, bone W1800
# L400, liver W150 L30) and the common abdominal soft-tissue window W400 L40.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
    "liver": (30.0, 150.0),
}

Window = tuple[float, float] | str | None


def scale_to_uint8(
    values: np.ndarray, lo: float | None = None, hi: float | None = None
) -> np.ndarray:
    """Map ``[lo, hi]`` (default: the finite min..max) linearly onto 0..255, clipped, as uint8.

    Non-finite values become ``lo``; a constant image (``hi <= lo``) becomes all zeros.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if lo is None or hi is None:
        if not finite.any():
            return np.zeros(values.shape, dtype=np.uint8)
        lo = float(values[finite].min()) if lo is None else lo
        hi = float(values[finite].max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    values = np.where(finite, values, lo)
    return np.rint(np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``[center - width/2, center + width/2]`` linearly onto 0..255 (clipped), as uint8."""
    if not width > 0:
        raise DataError(f"window width must be positive, got {width}")
    return scale_to_uint8(values, center - width / 2.0, center + width / 2.0)


def _first(value: Any) -> float | None:
    """The first number of a (possibly multi-valued) DICOM element, or None."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):  # incl. MultiValue
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _frame_attr(ds: Any, frame: int | None, seq: str, attr: str) -> float | None:
    """An attribute at top level, else in the per-frame or shared functional groups (enhanced)."""
    if attr in ds:
        return _first(ds.get(attr))
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per):
            groups.append(per[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        if seq in group and len(group[seq].value) and attr in group[seq].value[0]:
            return _first(group[seq].value[0].get(attr))
    return None


def _resolve_window(
    window: Window, ds: Any, frame: int | None, where: str
) -> tuple[float, float] | None:
    if window is None:
        c = _frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter")
        w = _frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth")
        return (c, w) if c is not None and w is not None and w > 0 else None
    if isinstance(window, str):
        key = window.lower().replace("-", "_")
        if key == "minmax":
            return None
        if key not in CT_WINDOWS:
            raise DataError(
                f"{where}: unknown window {window!r}; use (center, width), 'minmax' or one of "
                f"{', '.join(CT_WINDOWS)}"
            )
        modality = str(ds.get("Modality", "") or "")
        if modality and modality.upper() != "CT":
            raise DataError(
                f"{where}: the {window!r} window is in Hounsfield units, for CT, but this image's "
                f"modality is {modality!r}; give (center, width) instead"
            )
        return CT_WINDOWS[key]
    try:
        c, w = (float(v) for v in window)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: window must be (center, width) or a name, got {window!r}") from e
    if not w > 0:
        raise DataError(f"{where}: window width must be positive, got {w}")
    return c, w


def read_dicom(path: str | Path, window: Window = None, *, frame: int | None = None) -> np.ndarray:
    """Read one DICOM image as uint8 (H,W) grey or (H,W,3) RGB.

    Grey pixels are rescaled (RescaleSlope/Intercept or a Modality LUT) into modality units,
    then windowed: ``window=(center, width)``, a CT preset name from :data:`CT_WINDOWS`,
    ``"minmax"``, or ``None`` for the file's own WindowCenter/WindowWidth (the first when
    multi-valued) falling back to min-max. The window maps ``[c - w/2, c + w/2]`` linearly onto
    0..255. MONOCHROME1 is inverted so that bright means dense; RGB (and YBR, converted by
    pydicom) passes through. Multi-frame files need ``frame``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    where = str(path)
    if not Path(path).is_file():
        raise DataError(f"{where}: no such DICOM file")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DataError(f"{where}: not a DICOM file ({e})") from e
    except Exception as e:
        raise DataError(f"{where}: corrupt DICOM file ({type(e).__name__}: {e})") from e
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{where}: the DICOM file has no pixel data (not an image object)")
    try:
        nframes = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        nframes = 1
    if nframes > 1 and frame is None:
        raise DataError(
            f"{where}: a multi-frame DICOM with {nframes} frames; pass frame=0..{nframes - 1}"
        )
    if frame is not None and not 0 <= frame < nframes:
        raise DataError(f"{where}: frame {frame} is out of range; the file has {nframes} frame(s)")
    try:
        arr = pixel_array(ds, index=frame if nframes > 1 else None)
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        tsname = getattr(ts, "name", ts) or "unknown"
        raise DataError(
            f"{where}: cannot decode the pixel data (transfer syntax {tsname}): "
            f"{type(e).__name__}: {e}. Compressed DICOMs may need pylibjpeg or python-gdcm"
        ) from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour: RGB, YBR (converted) or palette (looked up)
        if arr.shape[-1] != 3:
            raise DataError(
                f"{where}: {arr.shape[-1]} samples per pixel; expected 1 (grey) or 3 (colour)"
            )
        if window is not None:
            raise DataError(
                f"{where}: windowing applies to greyscale images; this one is {photometric}"
            )
        if arr.dtype == np.uint8:
            return arr
        top = (
            2 ** (8 * arr.dtype.itemsize) - 1
            if photometric == "PALETTE COLOR"
            else 2 ** int(ds.get("BitsStored", 8)) - 1
        )
        return scale_to_uint8(arr, 0, top)
    if arr.ndim != 2:
        raise DataError(f"{where}: unexpected pixel array shape {arr.shape}")
    if "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    else:
        slope = _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        values = arr.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
    cw = _resolve_window(window, ds, frame, where)
    out = scale_to_uint8(values) if cw is None else apply_window(values, *cw)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out
