"""Overlay pictures of segmentation cases: the image, the reference and predicted contours, the prompt.

A run stores its best, median and worst image per test set (``cases/<set>/<rank>/...`` in its
predictions file); :func:`read_cases` reads them back and :func:`overlay_figure` draws them,
one row per test set: reference contours solid, predicted contours dashed, one colour per class,
box prompts as thin rectangles and point prompts as + (foreground) or x (background).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clinadapt.errors import DataError

RANKS = ("best", "median", "worst")
CLASS_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628")
PROMPT_COLOUR = "#ffd92f"


def read_cases(arrays: Mapping[str, np.ndarray], test_set: str) -> dict[str, dict[str, Any]]:
    """The stored cases of ``test_set``: rank -> {image, reference, prediction, boxes, points, ...}."""
    out: dict[str, dict[str, Any]] = {}
    for rank in RANKS:
        key = f"cases/{test_set}/{rank}/"
        if key + "image" not in arrays:
            continue
        out[rank] = {k[len(key) :]: np.asarray(v) for k, v in arrays.items() if k.startswith(key)}
    if not out:
        raise DataError(f"the predictions hold no overlay cases of {test_set!r}")
    return out


def _draw(ax: Any, case: Mapping[str, Any], class_names: Sequence[str], title: str) -> None:
    image = case["image"]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ref, pred = case["reference"], case["prediction"]
    for c in range(len(class_names)):
        colour = CLASS_COLOURS[c % len(CLASS_COLOURS)]
        if (ref == c + 1).any():
            ax.contour(ref == c + 1, [0.5], colors=[colour], linewidths=1.2)
        if c < len(pred) and pred[c].any():
            ax.contour(pred[c], [0.5], colors=[colour], linewidths=1.2, linestyles="--")
    for x1, y1, x2, y2 in case.get("boxes", np.zeros((0, 4))):
        ax.add_patch(_rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, PROMPT_COLOUR))
    points = case.get("points")
    if points is not None:
        labels = case.get("point_labels", np.ones(points.shape[:2]))
        for obj, labs in zip(points, labels, strict=True):
            for (x, y), lab in zip(obj, labs, strict=True):
                if lab >= 0:
                    ax.plot(x, y, "+" if lab == 1 else "x", color=PROMPT_COLOUR, ms=7, mew=1.5)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _rectangle(xy: tuple[float, float], w: float, h: float, colour: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, fill=False, edgecolor=colour, linewidth=0.8)


def overlay_figure(
    cases: Mapping[str, Mapping[str, Mapping[str, Any]]],
    class_names: Sequence[str],
    dice: Mapping[str, Mapping[str, float]] | None = None,
) -> Any:
    """A matplotlib figure: one row per test set (``cases[set][rank]``), best/median/worst."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sets = list(cases)
    if not sets:
        raise DataError("no cases to draw")
    fig, axes = plt.subplots(
        len(sets), len(RANKS), figsize=(2.4 * len(RANKS), 2.5 * len(sets)), squeeze=False
    )
    for row, name in enumerate(sets):
        for col, rank in enumerate(RANKS):
            ax = axes[row][col]
            case = cases[name].get(rank)
            if case is None:
                ax.axis("off")
                continue
            d = (dice or {}).get(name, {}).get(rank)
            title = f"{name}: {rank}" + (f" (Dice {d:.2f})" if d is not None else "")
            _draw(ax, case, class_names, title)
    handles = [
        Line2D([], [], color=CLASS_COLOURS[c % len(CLASS_COLOURS)], label=n)
        for c, n in enumerate(class_names)
    ]
    handles += [
        Line2D([], [], color="black", label="reference"),
        Line2D([], [], color="black", linestyle="--", label="prediction"),
        Line2D([], [], color=PROMPT_COLOUR, label="prompt"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
