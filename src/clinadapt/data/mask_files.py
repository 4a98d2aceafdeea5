"""Mask files (PNG/BMP/TIFF/GIF, .npy, NIfTI) as label maps, and image sizes and spacing from headers."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clinadapt.data.base import hash_files
from clinadapt.data.segmentation import MaskSource, integer_mask, to_label_map
from clinadapt.errors import DataError

MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".npy", ".nii", ".nii.gz")


def _mask_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "numpy"
    if name.endswith((".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")):
        return "pil"
    return None


def _pil_mask(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    where = str(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":  # palette masks (VOC style): the palette index is the label
                return np.asarray(im)
            if mode in ("LA", "PA", "RGBA", "RGBX", "RGBa", "La"):
                im = im.convert("RGB" if mode.startswith("RGB") else "L")
                mode = im.mode
            arr = np.asarray(im)
    except UnidentifiedImageError as e:
        raise DataError(
            f"{where}: not a readable mask image (corrupt or not really {path.suffix})"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: corrupt mask image ({type(e).__name__}: {e})") from e
    if arr.ndim == 3:
        if not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()):
            raise DataError(
                f"{where}: a colour mask; save each mask as a single-channel label map "
                "(grey or palette PNG) whose values are the labels"
            )
        arr = arr[..., 0]
    return arr


def read_mask_file(path: str | Path, slice: int | None = None) -> np.ndarray:
    """Decode one mask file as a 2D integer array of its raw values (nothing rescaled).

    PNG/BMP/TIFF/GIF via Pillow (palette indices for palette images; grey-valued RGB allowed),
    ``.npy`` (integer, boolean or integral float), NIfTI (the middle slice, or ``slice``, in
    the orientation the NIfTI image reader uses).
    """
    p = Path(path).expanduser()
    where = str(path)
    if not p.is_file():
        raise DataError(f"{where}: no such mask file")
    kind = _mask_kind(p)
    if slice is not None and kind != "nifti":
        raise DataError(f"{where}: a slice ({slice}) only applies to NIfTI masks")
    if kind == "pil":
        raw = _pil_mask(p)
    elif kind == "numpy":
        try:
            raw = np.load(p, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{where}: not a readable .npy array ({type(e).__name__}: {e})") from e
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
    elif kind == "nifti":
        from clinadapt.data.nifti import load_nifti_array, read_nifti_labels

        depth = load_nifti_array(p).shape[2]
        raw = read_nifti_labels(p, slices=depth // 2 if slice is None else slice)[1][0]
    else:
        raise DataError(
            f"{where}: unsupported mask file type; readable: {', '.join(MASK_EXTENSIONS)}"
        )
    if raw.ndim != 2 or raw.size == 0:
        raise DataError(f"{where}: a mask must be one 2D label map, got shape {raw.shape}")
    return integer_mask(raw, where)


def image_header(
    path: str | Path, slice: int | None = None
) -> tuple[tuple[int, int] | None, tuple[float, float] | None]:
    """(height, width) and pixel spacing (row, col) in mm of an image file, from its header.

    Either is None where the format does not say (spacing: PNG/JPEG/.npy; size: unknown types,
    checked later when the image is decoded).
    """
    from clinadapt.data.folder import _is_dicom, _kind

    p = Path(path)
    kind = _kind(p) or ("dicom" if _is_dicom(p) else None)
    try:
        if kind == "pil":
            from PIL import Image

            with Image.open(p) as im:
                w, h = im.size
            return (h, w), None
        if kind == "numpy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            return tuple(arr.shape[:2]), None  # type: ignore[return-value]
        if kind == "nifti":
            from clinadapt.data.nifti import load_nifti_array, nifti_plane_spacing

            x, y, _ = load_nifti_array(p).shape
            return (y, x), nifti_plane_spacing(p)
        if kind == "dicom":
            return _dicom_header(p, slice)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read the image header ({type(e).__name__}: {e})") from e
    return None, None


def _dicom_header(
    path: Path, frame: int | None
) -> tuple[tuple[int, int] | None, tuple[float, float] | None]:
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    size = (int(ds.Rows), int(ds.Columns)) if "Rows" in ds and "Columns" in ds else None
    spacing = None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        if key in ds and len(ds.get(key)) == 2:
            spacing = tuple(float(v) for v in ds.get(key))
            break
    if spacing is None and "SharedFunctionalGroupsSequence" in ds:
        group = ds.SharedFunctionalGroupsSequence[0]
        if "PixelMeasuresSequence" in group and "PixelSpacing" in group.PixelMeasuresSequence[0]:
            spacing = tuple(float(v) for v in group.PixelMeasuresSequence[0].PixelSpacing)
    return size, spacing  # type: ignore[return-value]


class FileMasks(MaskSource):
    """Masks read lazily from files and mapped through a label lookup (value -> class index)."""

    def __init__(
        self,
        paths: Sequence[str],
        lut: Mapping[int, int],
        class_names: Sequence[str],
        slices: Sequence[int | None] | None = None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.slices = list(slices) if slices is not None else [None] * len(self.paths)
        self.lut = dict(lut)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        where = self.describe(i)
        return to_label_map(
            read_mask_file(self.paths[i], self.slices[i]), self.lut, self.class_names, where
        )

    def describe(self, i: int) -> str:
        k = self.slices[i]
        return self.paths[i] if k is None else f"{self.paths[i]} (slice {k})"

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr((sorted(self.lut.items()), self.class_names, self.slices)).encode())
        return hash_files(h, self.paths).hexdigest()
