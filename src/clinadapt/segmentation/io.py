"""Reading images for ``clinadapt segment`` and writing its masks and overlay pictures.

A 2D image (PNG, JPEG, TIFF, DICOM, .npy) is read as uint8 pixels; a NIfTI volume is read raw
(Hounsfield units stay HU, so MedSAM's CT window can apply) in its stored orientation, and each
slice along the last axis is one image whose rows are the first voxel axis and columns the
second. Masks are written as label maps (0 background, 1..C): PNG for 2D input, NIfTI with the
input's affine and header for NIfTI input. Overlays show the image, the predicted contour and
fill per class, the prompts and, when given, the reference contour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import DataError
from clinadapt.segmentation.prompts import Prompts

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# one colour per class (1..C), repeating; tab10 without its grey
CLASS_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)
REFERENCE_COLOUR = (255, 255, 255)
PROMPT_COLOUR = (255, 215, 0)
NEGATIVE_COLOUR = (255, 0, 255)


def is_nifti(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def stem(path: str | os.PathLike[str]) -> str:
    """The file name without its image extension (``.nii.gz`` counted as one)."""
    name = Path(path).name
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


@dataclass
class InputImage:
    """One input file: its 2D images (one, or one per NIfTI slice) and how to write back."""

    path: Path
    images: list[np.ndarray]
    nifti: Any = None  # the nibabel image of a NIfTI input
    slices: list[int] = field(default_factory=list)


def read_input(path: str | os.PathLike[str], slices: list[int] | None = None) -> InputImage:
    """Read a 2D image file, or the slices (default: all) of a NIfTI volume along its last axis."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: no such image file")
    if not is_nifti(p):
        from clinadapt.data.folder import read_image_file

        return InputImage(p, [read_image_file(p)])
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: a NIfTI of shape {data.shape}; expected 2D or 3D")
    n = data.shape[2]
    chosen = list(range(n)) if slices is None else list(slices)
    bad = [s for s in chosen if not 0 <= s < n]
    if bad:
        raise DataError(f"{path}: slice(s) {bad} out of range; the volume has {n} slices")
    return InputImage(p, [data[:, :, s] for s in chosen], img, chosen)


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 (H,W) or (H,W,3) array as PNG, atomically."""
    from PIL import Image

    from clinadapt.store import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    return path


def write_masks(out_dir: Path, source: InputImage, label_maps: list[np.ndarray]) -> Path:
    """Write the label maps of one input: PNG (2D) or NIfTI with the input's geometry."""
    if max((int(m.max()) for m in label_maps), default=0) > 255:
        raise DataError(f"{source.path}: more than 255 labels do not fit a uint8 mask")
    if source.nifti is None:
        return write_png(out_dir / f"{stem(source.path)}_mask.png", label_maps[0].astype(np.uint8))
    import gzip

    from clinadapt.store import atomic_write_bytes

    shape = source.nifti.shape[:3] if len(source.nifti.shape) >= 3 else (*source.nifti.shape, 1)
    volume = np.zeros(shape, dtype=np.uint8)
    for s, m in zip(source.slices, label_maps, strict=True):
        volume[:, :, s] = m
    if len(source.nifti.shape) == 2:
        volume = volume[:, :, 0]
    header = source.nifti.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    out = out_dir / f"{stem(source.path)}_mask.nii.gz"
    nifti = type(source.nifti)(volume, source.nifti.affine, header)
    atomic_write_bytes(out, gzip.compress(nifti.to_bytes(), mtime=0))
    return out


def _display(image: np.ndarray) -> np.ndarray:
    """uint8 RGB for drawing: uint8 as is, anything else stretched by its 0.5-99.5 percentiles."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        lo, hi = np.percentile(f, (0.5, 99.5)) if f.size else (0.0, 1.0)
        img = (np.clip((f - lo) / max(hi - lo, 1e-8), 0, 1) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].copy()


def _contour(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(
    image: np.ndarray,
    label_map: np.ndarray,
    prompts: Prompts | None = None,
    reference: np.ndarray | None = None,
    alpha: float = 0.35,
) -> np.ndarray:
    """(H, W, 3) uint8: the image with each class filled and outlined, prompts and reference.

    Boxes are drawn as rectangles, foreground points as filled dots, background points as
    crosses; the reference label map (if given) as a white contour.
    """
    from PIL import Image, ImageDraw

    rgb = _display(image).astype(np.float64)
    labels = np.asarray(label_map)
    if labels.shape != rgb.shape[:2]:
        raise DataError(f"mask of shape {labels.shape} does not fit image {rgb.shape[:2]}")
    for value in (int(v) for v in np.unique(labels) if v != 0):
        colour = np.array(CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)], dtype=np.float64)
        region = labels == value
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
        rgb[_contour(region)] = colour
    if reference is not None:
        rgb[_contour(np.asarray(reference) > 0)] = REFERENCE_COLOUR
    picture = Image.fromarray(rgb.round().astype(np.uint8))
    if prompts is not None:
        draw = ImageDraw.Draw(picture)
        for box in [] if prompts.boxes is None else prompts.boxes:
            draw.rectangle([float(v) for v in box], outline=PROMPT_COLOUR)
        if prompts.points is not None:
            r = max(1.0, min(picture.size) / 100)
            for (x, y), lab in zip(
                prompts.points.reshape(-1, 2), prompts.point_labels.reshape(-1), strict=True
            ):
                if lab == 1:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=PROMPT_COLOUR)
                elif lab == 0:
                    draw.line([x - r, y - r, x + r, y + r], fill=NEGATIVE_COLOUR)
                    draw.line([x - r, y + r, x + r, y - r], fill=NEGATIVE_COLOUR)
    return np.asarray(picture)
