"""Prompts for promptable segmenters: boxes, positive/negative points, masks, a learned default.

Coordinates are pixel indices of the image as given (x = column, y = row); a box is
``x1, y1, x2, y2`` with both corners inside the object's extent (inclusive, as MedSAM derives it
from a mask). One :class:`Prompts` holds P object prompts for one image; each object gives one
mask. Prompts come from the user (:func:`read_prompts`: JSON or CSV per image) or are derived
from a reference label map the way published evaluations do it (:func:`prompts_from_mask`).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from clinadapt.errors import DataError

# A binary mask prompt becomes logits of +/- this value (sigmoid(4) = 0.982): SAM's mask input is
# the logits of an earlier prediction, so a user's 0/1 mask is mapped to confident logits.
MASK_PROMPT_LOGIT = 4.0
PromptKind = Literal["box", "points", "box+points", "mask"]


@dataclass
class Prompts:
    """P object prompts for one image; any of boxes, points (+ labels) and masks, all P long.

    ``boxes`` (P, 4) float; ``points`` (P, K, 2) float; ``point_labels`` (P, K) int with 1 for
    a foreground point, 0 for a background point and -1 for padding (ignored);
    ``masks`` (P, H, W) bool (a binary mask) or float (logits, e.g. an earlier output's);
    ``class_ids`` (P,) the label each prompt asks for (1..C; default 1).
    """

    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    masks: np.ndarray | None = None
    class_ids: np.ndarray | None = None

    @property
    def count(self) -> int:
        """P, the number of object prompts (0 for an empty prompt)."""
        for a in (self.boxes, self.points, self.masks, self.class_ids):
            if a is not None:
                return len(a)
        return 0

    @property
    def is_empty(self) -> bool:
        """No prompt at all: a segmenter then uses its learned default prompt."""
        return self.boxes is None and self.points is None and self.masks is None

    @property
    def asks_nothing(self) -> bool:
        """Zero objects on purpose (prompts derived from an empty reference): no mask."""
        return self.is_empty and self.class_ids is not None and len(self.class_ids) == 0

    @property
    def kind(self) -> str:
        """``box``, ``points``, ``box+points``, ``mask``, ... or ``none``."""
        parts = [
            n
            for n, a in (("box", self.boxes), ("points", self.points), ("mask", self.masks))
            if a is not None
        ]
        return "+".join(parts) or "none"

    def ids(self) -> np.ndarray:
        """The class each prompt asks for (all 1 when not given)."""
        if self.class_ids is not None:
            return self.class_ids
        return np.ones(self.count, dtype=np.int64)

    def single_point(self) -> bool:
        """Each object has exactly one labelled point and nothing else (SAM's ambiguous case)."""
        if self.points is None or self.boxes is not None or self.masks is not None:
            return False
        return bool(((self.point_labels >= 0).sum(axis=1) == 1).all())

    def select(self, index: Sequence[int] | np.ndarray) -> Prompts:
        """The prompts at ``index`` (in that order)."""
        idx = np.asarray(index, dtype=np.int64)

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Prompts(
            take(self.boxes),
            take(self.points),
            take(self.point_labels),
            take(self.masks),
            take(self.class_ids),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (masks are left out: they belong in image files)."""
        out: dict[str, Any] = {}
        if self.boxes is not None:
            out["boxes"] = self.boxes.tolist()
        if self.points is not None:
            out["points"] = self.points.tolist()
            out["point_labels"] = self.point_labels.tolist()
        if self.class_ids is not None:
            out["class_ids"] = self.class_ids.tolist()
        return out


def _array(value: Any, name: str, dtype: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be numbers, got {value!r}") from e
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return arr


def make_prompts(
    shape: tuple[int, int],
    *,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    mask: Any = None,
    class_ids: Any = None,
) -> Prompts:
    """Check and normalise user prompts for an image of ``shape`` = (H, W).

    ``boxes``: (4,) or (P, 4); ``points``: (K, 2) for one object or (P, K, 2);
    ``point_labels``: (K,) or (P, K), required with points; ``mask``: (H, W) or (P, H, W).
    Every error names the prompt and the value that is wrong.
    """
    h, w = int(shape[0]), int(shape[1])
    counts: dict[str, int] = {}
    b = p = lab = m = c = None
    if boxes is not None:
        b = _array(boxes, "boxes", np.float64)
        if b.ndim == 1:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4:
            raise DataError(
                f"boxes must be (4,) or (P, 4) as x1, y1, x2, y2; got shape {tuple(b.shape)}"
            )
        for i, (x1, y1, x2, y2) in enumerate(b):
            if x1 > x2 or y1 > y2:
                raise DataError(
                    f"box {i} {[float(v) for v in b[i]]} has x1 > x2 or y1 > y2; give "
                    "x1, y1, x2, y2 (top-left, bottom-right)"
                )
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                raise DataError(
                    f"box {i} {[float(v) for v in b[i]]} lies outside the {w}x{h} (WxH) image"
                )
        counts["boxes"] = len(b)
    if points is not None:
        p = _array(points, "points", np.float64)
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or p.shape[2] != 2 or p.shape[1] == 0:
            raise DataError(
                f"points must be (K, 2) for one object or (P, K, 2) as x, y; got shape "
                f"{tuple(np.shape(points))}"
            )
        if point_labels is None:
            raise DataError(
                "points were given without point_labels: give 1 (foreground) or 0 "
                "(background) for each point"
            )
        lab = _array(point_labels, "point_labels", np.float64)
        if lab.ndim == 1:
            lab = lab[None]
        if lab.shape != p.shape[:2]:
            raise DataError(
                f"point_labels have shape {tuple(np.shape(point_labels))} but points "
                f"{tuple(np.shape(points))}: one label per point"
            )
        if not np.isin(lab, (-1, 0, 1)).all():
            raise DataError(
                f"point_labels must be 1 (foreground), 0 (background) or -1 (padding); got "
                f"{sorted(set(lab.ravel().tolist()))}"
            )
        lab = lab.astype(np.int64)
        if ((lab >= 0).sum(axis=1) == 0).any():
            raise DataError("an object's points are all padding (-1): give at least one point")
        real = p[lab >= 0]
        bad = (real[:, 0] < 0) | (real[:, 0] > w) | (real[:, 1] < 0) | (real[:, 1] > h)
        if bad.any():
            raise DataError(f"point {real[bad][0].tolist()} lies outside the {w}x{h} (WxH) image")
        counts["points"] = len(p)
    elif point_labels is not None:
        raise DataError("point_labels were given without points")
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1:] != (h, w):
            raise DataError(
                f"mask prompt must be (H, W) or (P, H, W) at the image's size {h}x{w}; got "
                f"shape {tuple(np.shape(mask))}"
            )
        if m.dtype.kind in "biu":
            if not np.isin(m, (0, 1)).all():
                raise DataError("an integer mask prompt must hold only 0 and 1")
            m = m.astype(bool)
        else:
            m = _array(m, "mask", np.float32)
        counts["mask"] = len(m)
    if class_ids is not None:
        c = _array(class_ids, "class_ids", np.int64).reshape(-1)
        counts["class_ids"] = len(c)
    if len(set(counts.values())) > 1:
        said = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"prompts describe different numbers of objects ({said})")
    return Prompts(b, p, lab, m, c)


def mask_prompt_logits(masks: np.ndarray) -> torch.Tensor:
    """(P, H, W) mask prompt as logits: binary -> +/- MASK_PROMPT_LOGIT, float as given."""
    if masks.dtype == np.bool_:
        return torch.from_numpy(np.where(masks, MASK_PROMPT_LOGIT, -MASK_PROMPT_LOGIT)).float()
    return torch.from_numpy(np.ascontiguousarray(masks)).float()


# --- prompts derived from a reference label map ----------------------------------------------


@dataclass
class DerivedPrompts:
    """Prompts derived from a label map and, per prompt, the reference object it stands for."""

    prompts: Prompts
    targets: np.ndarray  # (P, H, W) bool
    class_ids: np.ndarray  # (P,) label value of each object


def _objects(label_map: np.ndarray, per: str, classes: Sequence[int] | None, min_pixels: int):
    from scipy import ndimage

    present = [int(v) for v in np.unique(label_map) if v != 0]
    if classes is not None:
        present = [v for v in present if v in set(classes)]
    out: list[tuple[int, np.ndarray]] = []
    for value in present:
        region = label_map == value
        if per == "class":
            parts = [region]
        else:  # 8-connectivity, as skimage.measure.label's default in 2D
            lab, n = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
            parts = [lab == i for i in range(1, n + 1)]
        out.extend((value, r) for r in parts if int(r.sum()) >= max(1, min_pixels))
    return out


def _box(region: np.ndarray, jitter: int, rng: np.random.Generator) -> np.ndarray:
    """MedSAM's box: the mask's extent, each side moved outwards by U{0..jitter} px, clipped."""
    ys, xs = np.nonzero(region)
    h, w = region.shape
    shift = rng.integers(0, jitter + 1, size=4) if jitter > 0 else np.zeros(4, dtype=np.int64)
    return np.array(
        [
            max(0, xs.min() - shift[0]),
            max(0, ys.min() - shift[1]),
            min(w - 1, xs.max() + shift[2]),
            min(h - 1, ys.max() + shift[3]),
        ],
        dtype=np.float64,
    )


def _points(region: np.ndarray, k: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """k foreground points: uniform over the object, or its centre first (SAM's evaluation)."""
    ys, xs = np.nonzero(region)
    chosen: list[int] = []
    if mode == "center":
        from scipy import ndimage

        # the pixel farthest from the object's boundary (SAM paper, App. D.1)
        dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1][ys, xs]
        ties = np.flatnonzero(dist == dist.max())  # a ridge: take its pixel nearest the centroid
        d2 = (xs[ties] - xs.mean()) ** 2 + (ys[ties] - ys.mean()) ** 2
        chosen.append(int(ties[np.argmin(d2)]))
    rest = np.setdiff1d(np.arange(len(xs)), chosen)
    n = min(k - len(chosen), len(rest))
    chosen.extend(rng.choice(rest, size=n, replace=False).tolist() if n > 0 else [])
    while len(chosen) < k:  # an object smaller than k pixels: repeat its pixels
        chosen.append(chosen[len(chosen) % max(1, len(xs))])
    return np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float64)


def _negatives(region: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(~region)
    if len(xs) == 0:
        raise DataError("negative points need background pixels, but the object fills the image")
    idx = rng.choice(len(xs), size=n, replace=len(xs) < n)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float64)


def prompts_from_mask(
    label_map: np.ndarray,
    kind: PromptKind = "box",
    *,
    per: Literal["component", "class"] = "class",
    jitter: int = 20,
    k: int = 1,
    negatives: int = 0,
    point_mode: Literal["random", "center"] = "random",
    classes: Sequence[int] | None = None,
    min_pixels: int = 1,
    seed: int | np.random.Generator = 0,
) -> DerivedPrompts:
    """Prompts for every object of ``label_map`` (H, W; 0 background), seeded.

    ``per``: one prompt per class present, or per 8-connected component of each class.
    ``box``: MedSAM's jittered box (each side outwards by 0..``jitter`` px, clipped);
    ``points``: ``k`` foreground points inside the object (SAM-Med2D / Mazurowski et al. use
    1, 3, 5), uniform or, with ``point_mode="center"``, the point farthest from the boundary
    first, plus ``negatives`` background points; ``box+points``: both; ``mask``: the
    reference mask itself (an upper bound for mask-prompt refinement).
    """
    arr = np.asarray(label_map)
    if arr.ndim != 2:
        raise DataError(f"label map must be (H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "biu":
        raise DataError(f"label map must hold integer labels, got dtype {arr.dtype}")
    if kind not in ("box", "points", "box+points", "mask"):
        raise DataError(f"prompt kind must be box, points, box+points or mask; got {kind!r}")
    if per not in ("component", "class"):
        raise DataError(f"per must be 'component' or 'class', got {per!r}")
    if jitter < 0 or k < 1 or negatives < 0:
        raise DataError(f"need jitter >= 0, k >= 1, negatives >= 0; got {jitter}, {k}, {negatives}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    objects = _objects(arr.astype(np.int64), per, classes, min_pixels)
    h, w = arr.shape
    if not objects:
        empty = Prompts(class_ids=np.zeros(0, dtype=np.int64))
        return DerivedPrompts(empty, np.zeros((0, h, w), dtype=bool), np.zeros(0, dtype=np.int64))
    ids = np.array([v for v, _ in objects], dtype=np.int64)
    targets = np.stack([r for _, r in objects])
    boxes = points = labels = masks = None
    if kind in ("box", "box+points"):
        boxes = np.stack([_box(r, jitter, rng) for _, r in objects])
    if kind in ("points", "box+points"):
        pts, labs = [], []
        for _, r in objects:
            pos = _points(r, k, point_mode, rng)
            neg = _negatives(r, negatives, rng) if negatives else np.zeros((0, 2))
            pts.append(np.concatenate([pos, neg]))
            labs.append(np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]))
        points = np.stack(pts)
        labels = np.stack(labs).astype(np.int64)
    if kind == "mask":
        masks = targets.copy()
    return DerivedPrompts(Prompts(boxes, points, labels, masks, ids), targets, ids)


# --- prompts from the user: JSON or CSV per image ---------------------------------------------

JSON_KEYS = ("boxes", "points", "point_labels", "class_ids")
CSV_BOX = ("x1", "y1", "x2", "y2")
CSV_POINT = ("x", "y", "label")


def _json_entry(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise DataError(f"{where}: expected an object with {', '.join(JSON_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(JSON_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; known: {', '.join(JSON_KEYS)}")
    return dict(entry)


def _read_json(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read prompts JSON: {e}") from e
    if not isinstance(data, Mapping):
        raise DataError(
            f"{path}: expected a mapping from image file name to its prompts, e.g. "
            '{"scan1.png": {"boxes": [[10, 20, 120, 140]]}}'
        )
    return {str(k): _json_entry(v, f"{path} [{k!r}]") for k, v in data.items()}


def _cell(row: dict[str, str], col: str) -> str:
    return (row.get(col) or "").strip()


def _read_csv(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
            fields = set(rows[0]) if rows else set()
    except OSError as e:
        raise DataError(f"{path}: cannot read prompts CSV: {e}") from e
    if "image" not in fields:
        raise DataError(
            f"{path}: a prompts CSV needs an 'image' column, and x1,y1,x2,y2 (a box) and/or "
            "x,y,label (a point) per row; 'object' groups rows of one object, 'class' names its label"
        )
    objects: dict[str, dict[str, dict[str, Any]]] = {}
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        image = _cell(row, "image")
        if not image:
            raise DataError(f"{where}: empty 'image' cell")
        obj = _cell(row, "object") or str(len(objects.get(image, {})))
        entry = objects.setdefault(image, {}).setdefault(obj, {"points": [], "labels": []})
        has_box = any(_cell(row, c) for c in CSV_BOX)
        has_point = any(_cell(row, c) for c in CSV_POINT)
        if not has_box and not has_point:
            raise DataError(f"{where}: neither a box (x1,y1,x2,y2) nor a point (x,y,label)")
        try:
            if has_box:
                if "box" in entry:
                    raise DataError(f"{where}: object {obj!r} of {image!r} has a second box")
                entry["box"] = [float(_cell(row, c)) for c in CSV_BOX]
            if has_point:
                entry["points"].append([float(_cell(row, "x")), float(_cell(row, "y"))])
                entry["labels"].append(int(_cell(row, "label") or "-99"))
        except ValueError as e:
            raise DataError(f"{where}: not a number: {e}") from e
        if _cell(row, "class"):
            entry["class"] = int(_cell(row, "class"))
    out: dict[str, dict[str, Any]] = {}
    for image, objs in objects.items():
        items = list(objs.values())
        entry: dict[str, Any] = {}
        if any("box" in o for o in items):
            if not all("box" in o for o in items):
                raise DataError(f"{path}: image {image!r} has objects with and without a box")
            entry["boxes"] = [o["box"] for o in items]
        if any(o["points"] for o in items):
            k = max(len(o["points"]) for o in items)
            if not all(o["points"] for o in items):
                raise DataError(f"{path}: image {image!r} has objects with and without points")
            # ragged point counts are padded with label -1 (SAM's "not a point")
            entry["points"] = [o["points"] + [[0.0, 0.0]] * (k - len(o["points"])) for o in items]
            entry["point_labels"] = [o["labels"] + [-1] * (k - len(o["labels"])) for o in items]
        if any("class" in o for o in items):
            entry["class_ids"] = [o.get("class", 1) for o in items]
        out[image] = entry
    return out


def read_prompts(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Per image file name, its prompts (unchecked; :func:`make_prompts` checks them).

    JSON: ``{"scan1.png": {"boxes": [[x1, y1, x2, y2], ...], "points": [[[x, y], ...], ...],
    "point_labels": [[1, 0], ...], "class_ids": [1, ...]}, ...}``.
    CSV: columns ``image`` and, per row, a box ``x1,y1,x2,y2`` and/or a point ``x,y,label``;
    ``object`` groups the rows of one object (default: each row its own), ``class`` its label.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompts file {str(p)!r} does not exist")
    if p.suffix.lower() == ".json":
        return _read_json(p)
    if p.suffix.lower() == ".csv":
        return _read_csv(p)
    raise DataError(f"{p}: prompts must be a .json or .csv file")


def prompts_for(
    table: Mapping[str, Mapping[str, Any]], image: str | os.PathLike[str], shape: tuple[int, int]
) -> Prompts:
    """The checked prompts of ``image`` in a :func:`read_prompts` table (by name or stem)."""
    name = Path(image).name
    stem = name.split(".")[0]
    entry = table.get(name)
    if entry is None:
        entry = next((v for k, v in table.items() if Path(k).name.split(".")[0] == stem), None)
    if entry is None:
        raise DataError(f"no prompts for image {name!r} in the prompts file")
    try:
        return make_prompts(shape, **entry)
    except DataError as e:
        raise DataError(f"prompts of {name!r}: {e}") from e


def write_prompts(path: str | os.PathLike[str], prompts: Mapping[str, Prompts]) -> Path:
    """Write prompts per image as JSON (readable by :func:`read_prompts`), atomically."""
    from clinadapt.store import atomic_path

    p = Path(path)
    with atomic_path(p) as tmp:
        Path(tmp).write_text(json.dumps({k: v.to_json() for k, v in prompts.items()}, indent=1))
    return p


# --- the learned default prompt ---------------------------------------------------------------


class DefaultPrompt(nn.Module):
    """A learned sparse prompt per class, used when an image comes with no prompt at all.

    SAMed (Zhang & Liu 2023) makes SAM prompt-free by dropping the prompt and training the
    decoder to emit one mask per class. Here each class gets its own learned prompt tokens
    instead (initialised as the embedding of a whole-image box, so training starts from SAM's
    "segment the object in this box"), which keeps SAM's decoder and its pretrained mask tokens
    unchanged. Open it for training with the ``prompt-encoder`` target.
    """

    def __init__(self, class_names: Sequence[str], tokens: torch.Tensor) -> None:
        super().__init__()
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (T, D), got {tuple(tokens.shape)}")
        self.class_names = list(class_names)
        n = len(self.class_names)
        if n < 1:
            raise DataError("a default prompt needs at least one class name")
        self.tokens = nn.Parameter(tokens.detach().clone()[None].repeat(n, 1, 1))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self) -> torch.Tensor:
        """(C, T, D) sparse prompt embeddings, one prompt per class."""
        return self.tokens


# --- the prompt protocol of an evaluation -----------------------------------------------------


class PromptSpec(BaseModel):
    """How each image's prompts are derived from its reference (one protocol per run).

    ``kind="none"`` gives no prompt at all: the segmenter's learned default prompt (prompt-free).
    Every image gets its own generator seeded by (seed, key), key = the image's index in its
    dataset, so an image's prompts do not depend on stream order, the method or the view.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["box", "points", "box+points", "mask", "none", "file"] = Field(
        "box",
        description="what is derived from the reference (MedSAM: box); file: the user's own "
        "prompts from `file`",
    )
    file: str | None = Field(
        None,
        description="kind file: a JSON or CSV of prompts per image file name (the format of "
        "clinadapt segment --prompts); every image the run uses needs an entry",
    )
    per: Literal["class", "component"] = Field(
        "class", description="one prompt per class present, or per connected component"
    )
    jitter: int = Field(
        20, ge=0, description="box sides moved outwards by 0..jitter px (MedSAM: 20 at 1024 px)"
    )
    jitter_reference: int | None = Field(
        1024,
        ge=1,
        description="the image side that jitter is measured on: MedSAM's 20 px are pixels of its "
        "1024x1024 input, so an image of side S gets round(jitter * S / 1024); None: the "
        "image's own pixels",
    )
    k: int = Field(1, ge=1, description="foreground points per object (1, 3, 5 in the literature)")
    negatives: int = Field(0, ge=0, description="background points per object")
    point_mode: Literal["random", "center"] = Field(
        "random", description="uniform points, or the one farthest from the boundary first"
    )
    classes: list[int] | None = Field(None, description="label values to prompt (default all)")

    @model_validator(mode="after")
    def _file_with_kind_file(self) -> PromptSpec:
        if (self.kind == "file") != (self.file is not None):
            raise ValueError("prompts from a file need kind 'file' and a file, and only then")
        return self

    def given(self, label_map: np.ndarray, image: str) -> DerivedPrompts:
        """Kind ``file``: the prompts the file gives ``image`` (matched by file name or stem);
        each prompt's target is the reference of the class it asks for."""
        if self.file is None:
            raise DataError("these prompts are derived from the reference, not given in a file")
        prompts = prompts_for(given_prompts(self.file), image, np.shape(label_map)[:2])
        ids = prompts.ids()
        targets = np.stack([np.asarray(label_map) == c for c in ids]) if len(ids) else None
        if targets is None:
            targets = np.zeros((0, *np.shape(label_map)[:2]), dtype=bool)
        return DerivedPrompts(prompts, targets, ids)

    def image_jitter(self, shape: tuple[int, ...]) -> int:
        """The jitter bound in pixels of an image of ``shape`` (H, W)."""
        if self.jitter_reference is None:
            return self.jitter
        return round(self.jitter * max(shape[:2]) / self.jitter_reference)

    def derive(self, label_map: np.ndarray, key: int, seed: int = 0) -> DerivedPrompts:
        """The prompts of one image (its reference ``label_map``, its dataset index ``key``):
        the same for that image in every view, stream order and method."""
        return self.draw(label_map, np.random.default_rng([int(seed), int(key)]))

    def draw(self, label_map: np.ndarray, rng: np.random.Generator) -> DerivedPrompts:
        """Prompts of one image from ``rng``: a fresh draw per training step, as MedSAM re-draws
        the box jitter each time it loads an image."""
        if self.kind == "file":
            raise DataError(
                "prompts given in a file are looked up by image name: use the dataset's "
                "prompts(i) (SegmentationDataset.with_prompts)"
            )
        if self.kind == "none":
            h, w = np.shape(label_map)[:2]
            return DerivedPrompts(
                Prompts(), np.zeros((0, h, w), dtype=bool), np.zeros(0, dtype=np.int64)
            )
        return prompts_from_mask(
            label_map,
            self.kind,
            per=self.per,
            jitter=self.image_jitter(np.shape(label_map)),
            k=self.k,
            negatives=self.negatives,
            point_mode=self.point_mode,
            classes=self.classes,
            seed=rng,
        )


@functools.lru_cache(maxsize=8)
def _read_given(path: str, mtime_ns: int, size: int) -> dict[str, dict[str, Any]]:
    return read_prompts(path)


def given_prompts(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """:func:`read_prompts` of ``path``, read once per process while the file is unchanged."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise DataError(f"prompts file {str(path)!r} does not exist")
    st = p.stat()
    return _read_given(str(p), st.st_mtime_ns, st.st_size)


def prompt_spec(**fields: Any) -> PromptSpec:
    """A checked :class:`PromptSpec`; a bad field is a ConfigError naming it."""
    from pydantic import ValidationError

    from clinadapt.errors import ConfigError

    try:
        return PromptSpec(**fields)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"prompt options {fields}: {problems}") from None


def derive_for(dataset: Any, spec: PromptSpec, seed: int = 0) -> list[DerivedPrompts]:
    """Prompts for every image of a segmentation dataset (view), in its order."""
    index = np.asarray(dataset.index)
    return [spec.derive(dataset.mask(i), int(index[i]), seed) for i in range(len(dataset))]
