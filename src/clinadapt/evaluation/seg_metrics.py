"""Segmentation metrics per image and class: Dice, IoU, normalised surface Dice and HD95.

Conventions for empty masks (per image and class; tested):
- reference and prediction both empty: Dice = IoU = NSD = 1 (nothing to find, nothing found);
  HD95 is undefined (no boundary) and left out of its mean, without counting as missing.
- exactly one of them empty (a missed object, or a false detection on an empty image): Dice =
  IoU = NSD = 0; HD95 is missing (NaN) and counted in ``hd95_missing``.
Surface distances are those of MONAI's ``get_edge_surface_distance`` (Euclidean, in millimetres
with each image's pixel spacing), computed directly with SciPy (MONAI's per-call transforms cost
about 10 ms per mask, too slow for corruption grids); NSD at tolerance tau follows Nikolov et al.
2021 (the share of both boundaries within tau of the other) and HD95 is the larger of the two
directed 95th percentiles. Dice, IoU, NSD and HD95 are checked against MONAI's ``compute_dice``,
``compute_iou``, ``compute_surface_dice`` and ``compute_hausdorff_distance`` in the tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from clinadapt.errors import DataError

TABLE_METRICS = ("dice", "iou", "nsd", "hd95")
# Default NSD tolerance in mm: 2 mm is the commonly reported setting for organ segmentation
# (e.g. the Medical Segmentation Decathlon follow-ups and MedSAM's evaluation of CT/MR).
NSD_TOLERANCE_MM = 2.0
# Reference sizes, as the diameter (mm) of a disc of the same area: below 10 mm is small
# (sub-centimetre lesions), 30 mm and more is large (a lung "mass" rather than a nodule).
SIZE_EDGES_MM = (10.0, 30.0)


def one_hot(mask: np.ndarray, num_classes: int, dims: int = 2) -> np.ndarray:
    """A label map 0..C ((H,W), or (X,Y,Z) with ``dims`` 3) as (C, ...) booleans; a (C, ...)
    array is checked and passed on."""
    mask = np.asarray(mask)
    shape = "(H,W)" if dims == 2 else "(X,Y,Z)"
    if mask.ndim == dims + 1:
        if mask.shape[0] != num_classes:
            raise DataError(f"a (C,{shape[1:]} mask needs C = {num_classes}, got {mask.shape[0]}")
        return mask.astype(bool)
    if mask.ndim != dims:
        raise DataError(
            f"a mask must be {shape} labels or (C,{shape[1:]} booleans, got {mask.shape}"
        )
    return np.stack([mask == c for c in range(1, num_classes + 1)])


def edges(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: the mask minus its erosion (4-connected, 6 in 3D; the border counts)."""
    return mask ^ binary_erosion(mask, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each boundary pixel of ``pred`` to ``ref``'s boundary, and back.

    The same definition as MONAI's ``get_edge_surface_distance`` (erosion edges, nearest edge
    pixel by a KD-tree over coordinates scaled by the spacing), without its per-call transforms.
    """
    scale = np.asarray(spacing, dtype=np.float64)
    p = np.argwhere(edges(pred)) * scale
    r = np.argwhere(edges(ref)) * scale
    return cKDTree(r).query(p, k=1)[0], cKDTree(p).query(r, k=1)[0]


def surface_scores(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """(NSD at ``tolerance_mm``, HD95 in mm) of two binary masks, with the empty conventions."""
    p, r = bool(pred.any()), bool(ref.any())
    if not p and not r:
        return 1.0, math.nan
    if p != r:
        return 0.0, math.nan
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    nsd = (np.sum(d_pr <= tolerance_mm) + np.sum(d_rp <= tolerance_mm)) / (len(d_pr) + len(d_rp))
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    return float(nsd), float(hd95)


@dataclass
class SegTable:
    """Per image (rows) and class (columns) values of one test set.

    ``dice``, ``iou``, ``nsd``, ``hd95`` (N,C) float (HD95 NaN where undefined or missing);
    ``ref_area``/``pred_area`` (N,C) pixels; ``spacing`` (N,2) mm; ``class_names`` (C).
    """

    dice: np.ndarray
    iou: np.ndarray
    nsd: np.ndarray
    hd95: np.ndarray
    ref_area: np.ndarray
    pred_area: np.ndarray
    spacing: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.dice)

    @property
    def ref_present(self) -> np.ndarray:
        return self.ref_area > 0

    @property
    def pred_present(self) -> np.ndarray:
        return self.pred_area > 0

    @property
    def hd95_missing(self) -> np.ndarray:
        """(N,C) an object in one mask only: HD95 cannot be measured."""
        return self.ref_present != self.pred_present

    def ref_diameter_mm(self) -> np.ndarray:
        """(N,C) diameter of the disc with the reference's area, or for volumes (3 spacings) of
        the sphere with its volume (0 for an empty reference)."""
        if self.spacing.shape[1] == 3:
            mm3 = self.ref_area * np.prod(self.spacing, axis=1)[:, None]
            return 2.0 * np.cbrt(3.0 * mm3 / (4.0 * np.pi))
        mm2 = self.ref_area * (self.spacing[:, 0] * self.spacing[:, 1])[:, None]
        return 2.0 * np.sqrt(mm2 / np.pi)

    def take(self, rows: np.ndarray) -> SegTable:
        return SegTable(
            *(getattr(self, f)[rows] for f in (*TABLE_METRICS, "ref_area", "pred_area", "spacing")),
            class_names=self.class_names,
        )

    def image_dice(self) -> np.ndarray:
        """(N,) mean Dice over the classes of each image (ranks cases for the overlays)."""
        return self.dice.mean(1)


def score_image(
    pred: np.ndarray,
    ref: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] = (1.0, 1.0),
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, np.ndarray]:
    """Per-class values of one image: dice, iou, nsd, hd95, ref_area, pred_area, each (C,).

    ``pred`` and ``ref`` are (H,W) label maps 0..C or (C,H,W) booleans (overlapping classes);
    with three spacings, (X,Y,Z) label volumes or (C,X,Y,Z) booleans (areas are voxel counts).
    """
    dims = len(spacing)
    p, r = one_hot(pred, num_classes, dims), one_hot(ref, num_classes, dims)
    if p.shape != r.shape:
        raise DataError(f"prediction {p.shape[1:]} and reference {r.shape[1:]} differ in size")
    out = {k: np.zeros(num_classes) for k in (*TABLE_METRICS, "ref_area", "pred_area")}
    for c in range(num_classes):
        inter = np.logical_and(p[c], r[c]).sum()
        sp, sr = p[c].sum(), r[c].sum()
        union = sp + sr - inter
        out["dice"][c] = 1.0 if sp + sr == 0 else 2.0 * inter / (sp + sr)
        out["iou"][c] = 1.0 if union == 0 else inter / union
        out["nsd"][c], out["hd95"][c] = surface_scores(p[c], r[c], spacing, tolerance_mm)
        out["ref_area"][c], out["pred_area"][c] = sr, sp
    return out


def score_images(
    preds: Sequence[np.ndarray],
    refs: Sequence[np.ndarray],
    spacing: np.ndarray,
    class_names: Sequence[str],
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> SegTable:
    """The :class:`SegTable` of a test set: one row per (prediction, reference) pair."""
    if len(preds) != len(refs) or len(refs) != len(spacing):
        raise DataError(
            f"{len(preds)} predictions, {len(refs)} references and {len(spacing)} spacings"
        )
    if len(refs) == 0:
        raise DataError("cannot score zero images")
    c = len(class_names)
    rows = [
        score_image(p, r, c, s, tolerance_mm)
        for p, r, s in zip(preds, refs, np.asarray(spacing), strict=True)
    ]
    cols = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    return SegTable(
        dice=cols["dice"],
        iou=cols["iou"],
        nsd=cols["nsd"],
        hd95=cols["hd95"],
        ref_area=cols["ref_area"].astype(np.int64),
        pred_area=cols["pred_area"].astype(np.int64),
        spacing=np.asarray(spacing, dtype=np.float64),
        class_names=list(class_names),
    )


def _mean(values: np.ndarray, where: np.ndarray | None = None) -> float:
    v = values if where is None else values[where]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _rate(hit: np.ndarray, among: np.ndarray) -> float:
    return float(hit[among].mean()) if among.any() else math.nan


def summarise_table(table: SegTable) -> dict[str, float]:
    """Headline metrics of a test set, over all (image, class) pairs and per class.

    ``dice``/``iou``/``nsd``: mean over all pairs (empty conventions above); ``dice_present``:
    over pairs whose reference has the object (what promptable-segmentation papers report);
    ``hd95``: mean over pairs where it is defined; ``hd95_missing``: share of pairs with an
    object in one mask only; ``false_detection``: share of empty references with a prediction.
    Per class: ``dice/<class>``, ``dice_present/<class>``, ``nsd/<class>``, ``hd95/<class>``.
    """
    present = table.ref_present
    anything = present | table.pred_present
    out = {
        "dice": _mean(table.dice),
        "dice_present": _mean(table.dice, present),
        "iou": _mean(table.iou),
        "nsd": _mean(table.nsd),
        "hd95": _mean(table.hd95),
        "hd95_missing": _rate(table.hd95_missing, anything),
        "false_detection": _rate(table.pred_present, ~present),
    }
    if len(table.class_names) > 1:
        for c, name in enumerate(table.class_names):
            out[f"dice/{name}"] = _mean(table.dice[:, c])
            out[f"dice_present/{name}"] = _mean(table.dice[:, c], present[:, c])
            out[f"nsd/{name}"] = _mean(table.nsd[:, c])
            out[f"hd95/{name}"] = _mean(table.hd95[:, c])
    return out


def size_bin_names(edges_mm: Sequence[float] = SIZE_EDGES_MM) -> list[str]:
    """``["<10 mm", "10-30 mm", ">=30 mm"]`` for edges (10, 30)."""
    e = [f"{x:g}" for x in edges_mm]
    if not e:
        return ["all"]
    return [f"<{e[0]} mm", *(f"{a}-{b} mm" for a, b in itertools.pairwise(e)), f">={e[-1]} mm"]


def size_bins(
    table: SegTable, edges_mm: Sequence[float] = SIZE_EDGES_MM
) -> dict[str, dict[str, dict[str, float]]]:
    """Per class and reference-size bin: n, dice, iou, nsd, hd95, hd95_missing.

    A pair falls in a bin by the diameter of a disc with its reference area (mm); pairs with an
    empty reference form the bin ``empty``, where ``false_detection`` is reported instead.
    """
    edges = sorted(float(e) for e in edges_mm)
    names = size_bin_names(edges)
    diam = table.ref_diameter_mm()
    which = np.digitize(diam, edges)  # 0..len(edges)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for c, cls in enumerate(table.class_names):
        present = table.ref_present[:, c]
        bins: dict[str, dict[str, float]] = {}
        for b, name in enumerate(names):
            m = present & (which[:, c] == b)
            if not m.any():
                continue
            bins[name] = {
                "n": int(m.sum()),
                "dice": _mean(table.dice[:, c], m),
                "iou": _mean(table.iou[:, c], m),
                "nsd": _mean(table.nsd[:, c], m),
                "hd95": _mean(table.hd95[:, c], m),
                "hd95_missing": float(table.hd95_missing[m, c].mean()),
            }
        if (~present).any():
            bins["empty"] = {
                "n": int((~present).sum()),
                "false_detection": float(table.pred_present[~present, c].mean()),
            }
        out[cls] = bins
    return out


def image_parts(table: SegTable, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per image, numerator and denominator of a headline metric: over any set of images,
    ``num.sum() / den.sum()`` is :func:`summarise_table`'s value (a bootstrap of images or
    patients, or a pool of several test sets and seeds, resamples these rows).

    ``metric`` is a key of :func:`summarise_table` (``dice``, ``dice_present``, ``hd95``,
    ``dice/<class>``, ...).
    """
    name, _, cls = metric.partition("/")
    cols = slice(None)
    if cls:
        if cls not in table.class_names:
            raise DataError(f"metric {metric!r}: no class {cls!r} in {table.class_names}")
        c = table.class_names.index(cls)
        cols = slice(c, c + 1)
    present, pred = table.ref_present[:, cols], table.pred_present[:, cols]
    if name in ("dice", "iou", "nsd"):
        v = getattr(table, name)[:, cols]
        return v.sum(1), np.full(len(v), float(v.shape[1]))
    if name == "dice_present":
        v = table.dice[:, cols]
        return np.where(present, v, 0.0).sum(1), present.sum(1).astype(float)
    if name == "hd95":
        v = table.hd95[:, cols]
        ok = np.isfinite(v)
        return np.where(ok, v, 0.0).sum(1), ok.sum(1).astype(float)
    if name == "hd95_missing":
        anything = present | pred
        return (table.hd95_missing[:, cols] & anything).sum(1).astype(float), anything.sum(
            1
        ).astype(float)
    if name == "false_detection":
        return (pred & ~present).sum(1).astype(float), (~present).sum(1).astype(float)
    raise DataError(f"unknown segmentation metric {metric!r}")


def table_from_arrays(
    arrays: dict[str, np.ndarray], test_set: str, class_names: list[str]
) -> SegTable:
    """The :class:`SegTable` of ``test_set`` from a run's predictions file (``table/<set>/...``)."""
    key = f"table/{test_set}/"
    missing = [
        f for f in (*TABLE_METRICS, "ref_area", "pred_area", "spacing") if key + f not in arrays
    ]
    if missing:
        raise DataError(f"the predictions hold no per-image table of {test_set!r} ({missing})")
    return SegTable(
        *(
            np.asarray(arrays[key + f])
            for f in (*TABLE_METRICS, "ref_area", "pred_area", "spacing")
        ),
        class_names=list(class_names),
    )
