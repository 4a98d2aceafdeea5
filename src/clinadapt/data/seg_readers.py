"""Segmentation data from files: image/mask folders, CSV manifests with a ``mask`` column, NIfTI.

Every mask is decoded once when the dataset is loaded: its values are checked against the label
map (and against binarity for a one-class task), its size against its image's header, and its
class areas counted. Bad input is a :class:`DataError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clinadapt.data.base import ImageSource, check_image
from clinadapt.data.dicom import Window
from clinadapt.data.folder import IMAGE_EXTENSIONS, _list_images, image_source
from clinadapt.data.manifest import SPLIT_ALIASES, ManifestTable
from clinadapt.data.mask_files import MASK_EXTENSIONS, FileMasks, image_header, read_mask_file
from clinadapt.data.nifti import (
    IntensityWindow,
    Slices,
    load_nifti_array,
    nifti_plane_spacing,
    nifti_stem,
    read_nifti_labels,
    read_nifti_planes,
)
from clinadapt.data.segmentation import (
    BACKGROUND,
    BINARY_VALUES,
    MaskSource,
    SegmentationDataset,
    check_mask_values,
    integer_mask,
    label_lookup,
    to_label_map,
)
from clinadapt.errors import DataError

LabelMap = Mapping[int, str] | Sequence[str] | None
Spacing = float | tuple[float, float] | None
MASK_SUFFIXES = ("_mask", "_segmentation", "_seg", "_label", "_labels")
SPACING_COLUMNS = ("spacing", "pixel_spacing", "spacing_mm")


def resolve_classes(
    class_names: Sequence[str] | None,
    label_map: LabelMap,
    values: set[int],
    where: str,
) -> tuple[list[str], dict[int, int]]:
    """Class names (labels 1..C) and the mask value -> class index lookup.

    ``label_map`` maps mask values to names (``{255: "lesion"}``), or lists the names of values
    1..K. Without either argument the classes are inferred from the ``values`` the masks hold:
    0/1 or 0/255 is one class ``"foreground"``; 0..K names classes ``"1"``..``"K"``.
    """
    if label_map is not None and not isinstance(label_map, Mapping):
        label_map = {i + 1: str(n) for i, n in enumerate(label_map)}
    if class_names is None and label_map is not None:
        names: list[str] = []
        for _, n in sorted((int(v), str(n)) for v, n in label_map.items()):
            if n != BACKGROUND and n not in names:
                names.append(n)
        class_names = names
    if class_names is None:
        nonzero = sorted(v for v in values if v != 0)
        if any(values <= set(p) for p in BINARY_VALUES):
            class_names = ["foreground"]
        elif nonzero == list(range(1, len(nonzero) + 1)):
            class_names = [str(v) for v in nonzero]
        else:
            raise DataError(
                f"{where}: the masks hold the values {nonzero[:10]}, not 0..K; name them with "
                "label_map (e.g. {" + ", ".join(f"{v}: 'class{v}'" for v in nonzero[:2]) + "})"
            )
    names = [str(c) for c in class_names]
    if not names:
        raise DataError(f"{where}: no classes (the label map names only the background)")
    return names, label_lookup(label_map, names, where)  # type: ignore[arg-type]


def parse_spacing(value: Spacing | str, where: str) -> tuple[float, float] | None:
    """``0.7``, ``(0.7, 0.8)`` or text ``"0.7"``, ``"0.7x0.8"``, ``"0.7 0.8"`` -> (row, col) mm."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        parts = value.replace("x", " ").replace(";", " ").replace(",", " ").split()
    elif isinstance(value, int | float):
        parts = [value]
    else:
        parts = list(value)
    try:
        nums = [float(p) for p in parts]
    except (TypeError, ValueError):
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or not all(np.isfinite(n) and n > 0 for n in nums):
        raise DataError(
            f"{where}: pixel spacing {value!r} is not one or two positive numbers in mm "
            "(e.g. 0.7 or 0.7x0.8)"
        )
    return nums[0], nums[1]


def _spacing_origin(origins: list[str]) -> str:
    kinds, counts = np.unique(np.asarray(origins), return_counts=True)
    if len(kinds) == 1:
        return str(kinds[0])
    return "; ".join(f"{k} ({c} images)" for k, c in zip(kinds, counts, strict=True))


def from_files(
    name: str,
    image_paths: Sequence[str],
    mask_paths: Sequence[str],
    *,
    class_names: Sequence[str] | None,
    label_map: LabelMap,
    where: str,
    slices: Sequence[int | None] | None = None,
    spacing: Spacing = None,
    row_spacing: Sequence[tuple[float, float] | None] | None = None,
    modality: str = "unknown",
    metadata: dict[str, np.ndarray] | None = None,
    window: Window = None,
) -> SegmentationDataset:
    """A dataset of image/mask file pairs; every mask is decoded and checked now."""
    n = len(image_paths)
    slices = list(slices) if slices is not None else [None] * n
    raw_values, shapes = [], []
    for path, k in zip(mask_paths, slices, strict=True):
        raw = read_mask_file(path, k)
        values, counts = np.unique(raw, return_counts=True)
        raw_values.append((values, counts))
        shapes.append(raw.shape)
    union = set().union(*(v.tolist() for v, _ in raw_values))
    names, lut = resolve_classes(class_names, label_map, union, where)
    areas = np.zeros((n, len(names)), dtype=np.int64)
    given = parse_spacing(spacing, f"{where}: spacing") if spacing is not None else None
    pixel_mm: list[tuple[float, float]] = []
    origins: list[str] = []
    for i, ((values, counts), shape) in enumerate(zip(raw_values, shapes, strict=True)):
        mask_where = mask_paths[i] if slices[i] is None else f"{mask_paths[i]} (slice {slices[i]})"
        check_mask_values(values.tolist(), lut, names, mask_where)
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            if lut[v]:
                areas[i, lut[v] - 1] += c
        size, header_mm = image_header(image_paths[i], slices[i])
        if size is not None and tuple(size) != tuple(shape):
            raise DataError(
                f"{image_paths[i]}: the image is {size[0]}x{size[1]} but its mask {mask_where} is "
                f"{shape[0]}x{shape[1]}"
            )
        from_row = row_spacing[i] if row_spacing is not None else None
        for value, origin in (
            (given, "given"),
            (from_row, "manifest column"),
            (header_mm, "file header"),
            ((1.0, 1.0), "assumed 1 mm (unknown)"),
        ):
            if value is not None:
                pixel_mm.append(value)
                origins.append(origin)
                break
    source = image_source(image_paths, slices, window)
    return SegmentationDataset(
        name=name,
        source=source,
        labels=None,
        class_names=names,
        modality=modality,
        metadata=metadata or {},
        masks=FileMasks(mask_paths, lut, names, slices),
        areas=areas,
        spacing=np.asarray(pixel_mm, dtype=np.float64),
        spacing_origin=_spacing_origin(origins),
    )


# --- image + mask folders ------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for ext in sorted(MASK_EXTENSIONS + IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _list_masks(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name.lower().endswith((*MASK_EXTENSIONS, ".jpg", ".jpeg"))
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def match_masks(
    image_dir: Path, mask_dir: Path, mask_suffix: str | Sequence[str] | None = None
) -> list[tuple[Path, Path]]:
    """Pair each image under ``image_dir`` with its mask under ``mask_dir`` (same sub-folder).

    A mask matches an image of stem ``s`` when its stem is ``s``, ``s`` plus a mask suffix
    (``_mask``, ``_segmentation``, ... or ``mask_suffix``), or ``s`` without nnU-Net's channel
    suffix ``_0000``; its extension may differ. An image without a mask, two candidate masks,
    or a mask without an image is an error.
    """
    images = _list_images(image_dir)
    if not images:
        raise DataError(f"{image_dir}: no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    masks: dict[tuple[str, str], list[Path]] = {}
    for m in _list_masks(mask_dir):
        key = (str(m.parent.relative_to(mask_dir)), _stem(m))
        masks.setdefault(key, []).append(m)
    suffixes = [mask_suffix] if isinstance(mask_suffix, str) else list(mask_suffix or MASK_SUFFIXES)
    pairs, used = [], set()
    for img in images:
        sub, stem = str(img.parent.relative_to(image_dir)), _stem(img)
        keys = [stem, *(stem + s for s in suffixes)]
        if stem.endswith("_0000"):
            keys.append(stem[:-5])
        found = [m for k in keys for m in masks.get((sub, k), [])]
        if not found:
            looked = ", ".join(f"{k}.*" for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise DataError(
                f"{img}: no mask file for this image (looked in {mask_dir / sub} for {looked})"
            )
        if len(found) > 1:
            raise DataError(
                f"{img}: {len(found)} candidate masks ({', '.join(map(str, found))}); keep one"
            )
        pairs.append((img, found[0]))
        used.add(found[0])
    orphans = [m for ms in masks.values() for m in ms if m not in used]
    if orphans:
        more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
        raise DataError(
            f"{mask_dir}: {len(orphans)} mask(s) have no image in {image_dir}: "
            f"{', '.join(map(str, orphans[:5]))}{more}"
        )
    return pairs


def load_mask_folder(
    root: str | Path,
    class_names: Sequence[str] | None = None,
    label_map: LabelMap = None,
    modality: str = "unknown",
    *,
    mask_suffix: str | Sequence[str] | None = None,
    spacing: Spacing = None,
    skip_empty: bool = False,
    window: Window = None,
    name: str | None = None,
) -> SegmentationDataset:
    """Read ``root/images`` + ``root/masks`` (or ``root/<split>/images`` + ``root/<split>/masks``).

    Masks match images by name (see :func:`match_masks`). NIfTI volume pairs (nnU-Net's
    ``case_0000.nii.gz`` + ``case.nii.gz``) are read slice by slice as :func:`load_nifti_segmentation`
    does, with ``skip_empty``. ``spacing`` (mm, one number or (row, col)) overrides what image
    headers say (DICOM pixel spacing, NIfTI voxel size); PNG/JPEG images have none, so it is
    assumed 1 mm and the dataset says so in ``spacing_origin``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir()}
    groups: list[tuple[str | None, Path]] = []
    if "images" in subdirs:
        groups = [(None, root)]
    else:
        groups = [
            (SPLIT_ALIASES[k], d)
            for k, d in sorted(subdirs.items())
            if k in SPLIT_ALIASES and (d / "images").is_dir()
        ]
    if not groups:
        raise DataError(
            f"{root}: expected root/images and root/masks, or root/<split>/images and "
            "root/<split>/masks (split: train/val/test)"
        )
    pairs, splits = [], []
    for split, base in groups:
        if not (base / "masks").is_dir():
            raise DataError(f"{base}: has images/ but no masks/ folder")
        found = match_masks(base / "images", base / "masks", mask_suffix)
        pairs += found
        splits += [split or ""] * len(found)
    ds_name = name or root.name
    volumes = [p for p in pairs if _is_volume(p[0])]
    if volumes and len(volumes) < len(pairs):
        raise DataError(f"{root}: mixes NIfTI volumes with 2D images; keep one kind per dataset")
    if volumes:
        parts = [
            load_nifti_segmentation(
                img,
                msk,
                label_map=label_map,
                class_names=class_names,
                skip_empty=skip_empty,
                window="percentile" if window is None else window,
                modality=modality,
                metadata={"split": s} if s else None,
            )
            for (img, msk), s in zip(pairs, splits, strict=True)
        ]
        return join_volumes(parts, ds_name, spacing)
    meta = {"split": np.array(splits)} if groups[0][0] is not None else {}
    ds = from_files(
        ds_name,
        [str(p[0]) for p in pairs],
        [str(p[1]) for p in pairs],
        class_names=class_names,
        label_map=label_map,
        where=str(root),
        spacing=spacing,
        modality=modality,
        metadata=meta,
        window=window,
    )
    return _drop_empty(ds) if skip_empty else ds


def is_mask_folder(root: Path) -> bool:
    """Whether ``root`` is laid out as images/ + masks/ (directly or under split folders)."""
    bases = [root] + [d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_ALIASES]
    return any((b / "images").is_dir() and (b / "masks").is_dir() for b in bases)


def has_mask_column(csv_path: Path, mask_col: str = "mask") -> bool:
    """Whether the manifest's header names a mask column."""
    import csv

    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False  # the classification reader reports what is wrong with the file
    return mask_col in [h.strip() for h in header]


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz")) and load_nifti_array(path).shape[2] > 1


def _drop_empty(ds: SegmentationDataset) -> SegmentationDataset:
    keep = np.flatnonzero(~ds.empty())
    if len(keep) == 0:
        raise DataError(f"{ds.name}: every image has an empty mask, so skip_empty leaves nothing")
    return ds.subset(keep)


# --- CSV manifests -------------------------------------------------------------------------------
def load_seg_manifest(
    csv_path: str | Path,
    path_col: str = "path",
    mask_col: str = "mask",
    class_names: Sequence[str] | None = None,
    label_map: LabelMap = None,
    modality: str = "unknown",
    root: str | Path | None = None,
    *,
    spacing: Spacing = None,
    skip_empty: bool = False,
    window: Window = None,
    name: str | None = None,
) -> SegmentationDataset:
    """Read a CSV manifest with one row per image: its path, its mask's path and metadata.

    Paths are relative to ``root`` (default: the CSV's folder). Metadata columns are read as
    for classification manifests (``site`` -> ``domain``, ``patient`` -> ``patient_id``, ...);
    a ``slice`` column picks the slice of NIfTI images and masks; a ``spacing`` (or
    ``pixel_spacing``) column gives mm per pixel per row (``0.7`` or ``0.7x0.8``), overriding
    image headers, and ``spacing`` the same for every row.
    """
    table = ManifestTable.read(
        csv_path, [path_col, mask_col], "choose others with path_col=/mask_col="
    )
    base = Path(root).expanduser() if root is not None else table.path.parent
    slices = table.slices() if table.has("slice") else [None] * len(table)
    images = table.paths(path_col, base, slices)
    masks = table.paths(mask_col, base, slices, what="mask")
    sp_col = next((c for c in table.fields if c.strip().lower() in SPACING_COLUMNS), None)
    row_spacing = (
        [parse_spacing(table.cell(i, sp_col), table.at(i)) for i in range(len(table))]
        if sp_col
        else None
    )
    skip = {path_col, mask_col} | ({sp_col} if sp_col else set())
    ds_name = name or (table.path.parent.name if table.path.stem == "manifest" else table.path.stem)
    ds = from_files(
        ds_name,
        images,
        masks,
        class_names=class_names,
        label_map=label_map,
        where=str(table.path),
        slices=slices,
        spacing=spacing,
        row_spacing=row_spacing,
        modality=modality,
        metadata=table.metadata(skip),
        window=window,
    )
    return _drop_empty(ds) if skip_empty else ds


# --- NIfTI volumes -------------------------------------------------------------------------------
class _Slices(ImageSource):
    """2D slices held in memory (sizes may differ between volumes), named by file and slice."""

    def __init__(self, planes: list[np.ndarray], names: list[str]) -> None:
        self.planes, self.names = planes, names

    def __len__(self) -> int:
        return len(self.planes)

    def load(self, i: int) -> np.ndarray:
        return self.planes[i]

    def describe(self, i: int) -> str:
        return self.names[i]

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256("|".join(self.names).encode())
        for p in self.planes:
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p).data)
        return h.hexdigest()


class _SliceMasks(_Slices, MaskSource):
    def __init__(self, planes: list[np.ndarray], names: list[str], num_classes: int) -> None:
        super().__init__(planes, names)
        self.num_classes = num_classes

    def fingerprint(self) -> str:
        return f"{self.num_classes}|{super().fingerprint()}"


def load_nifti_segmentation(
    image: str | Path,
    labels: str | Path,
    label_map: LabelMap = None,
    axis: int = 2,
    slices: Slices = "all",
    skip_empty: bool = False,
    window: IntensityWindow = "percentile",
    *,
    class_names: Sequence[str] | None = None,
    volume: int | None = None,
    modality: str = "unknown",
    metadata: Mapping[str, str] | None = None,
    name: str | None = None,
) -> SegmentationDataset:
    """One dataset image per slice of a NIfTI volume, with its label volume as the masks.

    ``label_map`` maps label values to class names (``{1: "liver", 2: "tumour"}``) or lists the
    names of values 1..K; values the map leaves out are an error (map them to ``"background"``
    to ignore them). ``skip_empty`` drops slices without any labelled voxel. Spacing comes from
    the image's voxel size; metadata holds ``patient_id`` (file stem) and ``slice``, plus
    constant ``metadata`` such as ``{"domain": "site-a"}``.
    """
    where = str(labels)
    img_shape = load_nifti_array(image, volume).shape
    row_col = nifti_plane_spacing(image, axis, volume)
    positions, planes = read_nifti_planes(image, axis, slices, window, volume)
    lab_shape = load_nifti_array(labels).shape
    if img_shape != lab_shape:
        raise DataError(
            f"{labels}: the label volume is {'x'.join(map(str, lab_shape))} but its image "
            f"{image} is {'x'.join(map(str, img_shape))}"
        )
    if not np.allclose(nifti_plane_spacing(labels, axis), row_col, rtol=1e-3):
        raise DataError(
            f"{labels}: its voxel size differs from its image {image}'s; the labels are not on "
            "the image's grid"
        )
    _, raw = read_nifti_labels(labels, axis, positions)
    raw = [integer_mask(r, where) for r in raw]
    union = set().union(*(np.unique(r).tolist() for r in raw))
    names, lut = resolve_classes(class_names, label_map, union, where)
    masks = [
        to_label_map(r, lut, names, f"{where} (slice {k})")
        for r, k in zip(raw, positions, strict=True)
    ]
    keep = [i for i, m in enumerate(masks) if not skip_empty or m.any()]
    if not keep:
        raise DataError(f"{labels}: no slice along axis {axis} has a labelled voxel")
    stem = nifti_stem(image)
    meta = {
        "patient_id": np.full(len(keep), stem),
        "slice": np.array([str(positions[i]) for i in keep]),
    }
    for key, value in (metadata or {}).items():
        meta[key] = np.full(len(keep), str(value))
    kept = [masks[i] for i in keep]
    return SegmentationDataset(
        name=name or stem,
        source=_Slices(
            [check_image(planes[i], str(image)) for i in keep],
            [f"{image} (axis {axis}, slice {positions[i]})" for i in keep],
        ),
        labels=None,
        class_names=names,
        modality=modality,
        metadata=meta,
        masks=_SliceMasks(
            kept, [f"{labels} (axis {axis}, slice {positions[i]})" for i in keep], len(names)
        ),
        areas=np.stack([np.bincount(m.ravel(), minlength=len(names) + 1)[1:] for m in kept]),
        spacing=np.tile(row_col, (len(keep), 1)),
        spacing_origin="file header",
    )


def join_volumes(
    parts: Sequence[SegmentationDataset], name: str, spacing: Spacing = None
) -> SegmentationDataset:
    """One dataset of the slices of several volumes (they must share class names)."""
    first = parts[0]
    for p in parts[1:]:
        if p.class_names != first.class_names:
            raise DataError(
                f"{p.describe_mask(0)}: its classes {p.class_names} differ from "
                f"{first.class_names} of {first.describe_mask(0)}; give label_map= so all agree"
            )
    planes = [p.image(i) for p in parts for i in range(len(p))]
    masks = [p.mask(i) for p in parts for i in range(len(p))]
    keys = set.intersection(*(set(p.metadata) for p in parts))
    given = parse_spacing(spacing, f"{name}: spacing") if spacing is not None else None
    return SegmentationDataset(
        name=name,
        source=_Slices(planes, [p.describe(i) for p in parts for i in range(len(p))]),
        labels=None,
        class_names=list(first.class_names),
        modality=first.modality,
        metadata={k: np.concatenate([p.metadata[k] for p in parts]) for k in sorted(keys)},
        masks=_SliceMasks(
            masks, [p.describe_mask(i) for p in parts for i in range(len(p))], first.num_classes
        ),
        areas=np.concatenate([p.areas for p in parts]),
        spacing=np.tile(given, (len(planes), 1))
        if given
        else np.concatenate([p.spacing for p in parts]),
        spacing_origin="given" if given else "file header",
    )
