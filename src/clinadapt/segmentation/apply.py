"""What ``clinadapt segment`` does: load a segmenter (base or adapted weights), segment files with
prompts from the command line or a prompts file, write masks and overlays."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import ConfigError, DataError
from clinadapt.segmentation.base import Segmenter
from clinadapt.segmentation.io import is_nifti, overlay, read_input, stem, write_masks, write_png
from clinadapt.segmentation.prompts import Prompts, make_prompts, prompts_for, read_prompts

ADAPTED_FORMAT = "clinadapt-adapted/1"
IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".dcm",
    ".npy",
    ".nii",
    ".nii.gz",
)


NO_PROMPT = (
    "no prompt: give --box / --point, a --prompts file, or adapted weights with a learned "
    "default prompt"
)


def parse_numbers(text: str, n: int, what: str) -> list[float]:
    """``"10,20,120,140"`` -> four floats; the error names the option and the value."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != n:
        raise ConfigError(f"{what} {text!r}: expected {n} comma-separated numbers")
    return values


def cli_prompts(
    shape: tuple[int, int],
    boxes: Sequence[str] = (),
    points: Sequence[str] = (),
    negatives: Sequence[str] = (),
) -> Prompts:
    """Prompts from ``--box x1,y1,x2,y2`` (one object each), ``--point x,y`` (foreground) and
    ``--negative x,y`` (background); points belong to one object (with at most one box)."""
    b = [parse_numbers(t, 4, "--box") for t in boxes]
    pts = [parse_numbers(t, 2, "--point") for t in points]
    neg = [parse_numbers(t, 2, "--negative") for t in negatives]
    if (pts or neg) and len(b) > 1:
        raise ConfigError(
            "--point/--negative describe one object, but several --box were given; use a "
            "prompts file (--prompts) for several objects with points"
        )
    return make_prompts(
        shape,
        boxes=b or None,
        points=(pts + neg) or None,
        point_labels=([1] * len(pts) + [0] * len(neg)) or None,
    )


def is_adapted(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The metadata of a clinadapt adapted-weights file, or None for any other weights."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return None
    from clinadapt.targets.io import read_metadata

    meta = read_metadata(p)
    return meta if meta.get("format") == ADAPTED_FORMAT else None


def load_for_inference(
    name: str | None, weights: str | None = None, device: str = "cpu"
) -> Segmenter:
    """A segmenter with base weights, or a base segmenter with adapted weights loaded on it."""
    from clinadapt.segmentation.load import load_segmenter

    meta = is_adapted(weights) if weights is not None else None
    if meta is None:
        if name is None:
            raise ConfigError("--model is needed unless --weights is a clinadapt adapted file")
        return load_segmenter(name, weights=weights, device=device)
    base = meta.get("base_model")
    if name is not None and base != name:
        raise ConfigError(f"{weights} was adapted from {base!r}, not from --model {name!r}")
    seg = load_segmenter(str(base), device=device)
    attach_adapted(seg, str(weights), meta)
    return seg


def attach_adapted(seg: Segmenter, path: str, meta: dict[str, str]) -> None:
    """Load adapted tensors onto ``seg``, first giving it the default prompt the file has."""
    from safetensors import safe_open

    from clinadapt.targets.io import load_adapted

    with safe_open(path, framework="pt") as f:
        has_prompt = "default_prompt.tokens" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    if has_prompt and seg.default_prompt is None:
        names = [n for n in meta.get("class_names", "").split("\n") if n]
        if not names:
            with safe_open(path, framework="pt") as f:
                n = f.get_slice("default_prompt.tokens").get_shape()[0]
            names = [f"class-{i + 1}" for i in range(n)]
        seg.add_default_prompt(names)
    load_adapted(seg, path, device=seg.device)


@dataclass
class Segmented:
    """What was written for one input file."""

    image: str
    mask: str
    overlays: list[str]
    objects: int
    foreground_pixels: int
    scores: list[float]


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files of a folder (not recursive), sorted by name."""
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = sorted(
        f for f in d.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def segment_files(
    seg: Segmenter,
    images: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    prompts_file: str | None = None,
    boxes: Sequence[str] = (),
    points: Sequence[str] = (),
    negatives: Sequence[str] = (),
    modality: str | None = None,
    slices: list[int] | None = None,
    on_done: Callable[[Segmented], Any] | None = None,
) -> list[Segmented]:
    """Segment each file with its prompts (from the file or the command line) and write it."""
    table = read_prompts(prompts_file) if prompts_file else None
    if table is None and not (boxes or points or negatives) and seg.default_prompt is None:
        raise ConfigError(NO_PROMPT)
    out = Path(out_dir)
    done: list[Segmented] = []
    for path in images:
        source = read_input(path, slices if is_nifti(path) else None)
        maps, scores, pictures = [], [], []
        for k, image in enumerate(source.images):
            shape = image.shape[:2]
            if table is not None:
                prompts = prompts_for(table, path, shape)
            elif boxes or points or negatives:
                prompts = cli_prompts(shape, boxes, points, negatives)
            else:
                prompts = Prompts()
            result = seg.predict(seg.embed(image, modality), prompts)
            labels = result.label_map()
            maps.append(labels)
            scores.extend(float(s) for s in result.scores)
            if source.nifti is None or labels.any():
                pictures.append((k, overlay(image, labels, None if prompts.is_empty else prompts)))
        mask_path = write_masks(out, source, maps)
        written = []
        for k, picture in pictures:
            suffix = "" if source.nifti is None else f"_slice{source.slices[k]:03d}"
            written.append(str(write_png(out / f"{stem(path)}{suffix}_overlay.png", picture)))
        item = Segmented(
            str(path),
            str(mask_path),
            written,
            objects=len(scores),
            foreground_pixels=int(sum(int((m > 0).sum()) for m in maps)),
            scores=scores,
        )
        done.append(item)
        if on_done is not None:
            on_done(item)
    return done


def class_names_metadata(seg: Segmenter) -> dict[str, str]:
    """Metadata for save_adapted that lets a default prompt be rebuilt with its class names."""
    if seg.default_prompt is None:
        return {}
    return {"class_names": "\n".join(seg.default_prompt.class_names)}


def segment_dataset(
    seg: Segmenter,
    dataset,
    out_dir: str | os.PathLike[str],
    spec,
    *,
    limit: int | None = None,
    seed: int = 0,
    on_done: Callable[[Segmented], Any] | None = None,
) -> list[Segmented]:
    """Segment a segmentation dataset's images with prompts derived from their references.

    Writes ``<dataset>_<index>_mask.png`` and an overlay with the reference contour (white) and
    the derived prompt, per image.
    """
    from clinadapt.segmentation.prompts import derive_for

    if getattr(dataset, "task", None) != "segmentation":
        raise DataError(
            f"{dataset.name} is a {dataset.task} dataset: prompts are derived from reference "
            "masks, so --data needs a segmentation dataset"
        )
    view = dataset if limit is None else dataset.subset(range(min(limit, len(dataset))))
    out = Path(out_dir)
    done: list[Segmented] = []
    for i, derived in enumerate(derive_for(view, spec, seed)):
        image, reference = view.pair(i)
        result = seg.predict(seg.embed(image), derived.prompts)
        labels = result.label_map() if len(result.probs) else np.zeros(reference.shape, np.int64)
        base = f"{dataset.name}_{int(view.index[i]):05d}"
        mask = write_png(out / f"{base}_mask.png", labels.astype(np.uint8))
        prompts = None if derived.prompts.is_empty else derived.prompts
        picture = overlay(image, labels, prompts, reference=reference)
        item = Segmented(
            view.describe(i),
            str(mask),
            [str(write_png(out / f"{base}_overlay.png", picture))],
            objects=len(result.scores),
            foreground_pixels=int((labels > 0).sum()),
            scores=[float(s) for s in result.scores],
        )
        done.append(item)
        if on_done is not None:
            on_done(item)
    return done
