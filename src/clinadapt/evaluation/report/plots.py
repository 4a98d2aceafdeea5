"""Drawing: grouped bars with CI whiskers, curves with CI bands, reliability and risk-coverage.

Every function takes the cells to draw and returns a matplotlib figure; what the numbers mean is
decided by the panels that call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clinadapt.evaluation.metric_info import MetricInfo
from clinadapt.evaluation.report.cells import Cell
from clinadapt.evaluation.report.figures import pyplot
from clinadapt.evaluation.report.style import Style


@dataclass
class Series:
    """One condition's cells along an axis."""

    label: str
    style: Style
    cells: list[Cell]


def _limits(ax, info: MetricInfo, series: Sequence[Series]) -> None:
    vals = [
        v
        for s in series
        for c in s.cells
        for v in (c.value, c.low, c.high, *c.seeds)
        if not math.isnan(v)
    ]
    lo = info.low if info.low is not None else (min(vals, default=0.0) if vals else 0.0)
    hi = info.high if info.high is not None and info.high <= 1.0 else None
    if hi is None:
        top = max(vals, default=1.0)
        hi = top + 0.05 * abs(top - lo) if top > lo else lo + 1.0
    ax.set_ylim(lo, hi)


def _ylabel(info: MetricInfo, suffix: str = "") -> str:
    unit = f" ({info.unit})" if info.unit else ""
    arrow = "higher is better" if info.higher_is_better else "lower is better"
    return f"{info.label}{unit}{suffix}\n({arrow})"


def _errors(cells: list[Cell]) -> np.ndarray:
    return np.array(
        [[c.value - c.low, c.high - c.value] if c.has_ci else [0.0, 0.0] for c in cells]
    ).T


def bars(
    panels: list[tuple[str, list[str], list[Series]]],
    info: MetricInfo,
    ylabel_suffix: str = "",
):
    """Grouped bars, one axis per panel (title, x labels, series), one group per x label and one
    bar per series, with CI whiskers and each seed's value as a dot."""
    plt = pyplot()
    widest = max(len(p[1]) * max(1, len(p[2])) for p in panels)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(5.5, 0.55 * widest + 2.5) * len(panels) + 2.5, 3.9),
        squeeze=False,
        sharey=True,
    )
    for ax, (title, xlabels, series) in zip(axes.flat, panels, strict=True):
        width = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            x = np.arange(len(xlabels)) + (i - (len(series) - 1) / 2) * width
            values = np.array([c.value for c in s.cells])
            ax.bar(
                x,
                values,
                width,
                color=s.style.colour,
                hatch=s.style.hatch,
                edgecolor="white",
                label=s.label,
            )
            ax.errorbar(
                x,
                values,
                yerr=_errors(s.cells),
                fmt="none",
                ecolor="#222",
                elinewidth=1,
                capsize=3,
            )
            for xi, c in zip(x, s.cells, strict=True):
                if len(c.seeds) > 1:
                    ax.scatter(
                        np.full(len(c.seeds), xi), c.seeds, s=9, color="#222", zorder=3, lw=0
                    )
        ax.set_xticks(np.arange(len(xlabels)), xlabels, fontsize=7.5)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].set_ylabel(_ylabel(info, ylabel_suffix), fontsize=9)
    _limits(axes.flat[0], info, [s for p in panels for s in p[2]])
    axes.flat[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def curves(
    panels: list[tuple[str, list[float], list[Series]]],
    xticks: list[tuple[float, str]],
    xlabel: str,
    info: MetricInfo,
):
    """One axis per panel (title, x positions, series); lines with CI bands and seed dots.

    Series are shifted sideways by a few hundredths so that equal values stay visible.
    """
    plt = pyplot()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols + 0.6, 2.9 * rows + 0.9), squeeze=False, sharey=True
    )
    n_series = max(len(p[2]) for p in panels)
    span = max(xticks[-1][0] - xticks[0][0], 1.0) if xticks else 1.0
    for ax, (title, xs, series) in zip(axes.flat, panels, strict=False):
        for i, s in enumerate(series):
            dx = (i - (n_series - 1) / 2) * 0.012 * span
            x = np.asarray(xs, dtype=float) + dx
            y = np.array([c.value for c in s.cells])
            ax.plot(x, y, ms=4, lw=1.4, label=s.label, **s.style.line())
            ok = np.array([c.has_ci for c in s.cells])
            if ok.any():
                lo = np.array([c.low for c in s.cells])
                hi = np.array([c.high for c in s.cells])
                ax.fill_between(x[ok], lo[ok], hi[ok], color=s.style.colour, alpha=0.13, lw=0)
            for xi, c in zip(x, s.cells, strict=True):
                if len(c.seeds) > 1:
                    ax.scatter(np.full(len(c.seeds), xi), c.seeds, s=6, color=s.style.colour, lw=0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([t for t, _ in xticks], [lab for _, lab in xticks], fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(_ylabel(info), fontsize=8)
    _limits(axes.flat[0], info, [s for p in panels for s in p[2]])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, fontsize=8, loc="lower center", ncol=min(3, len(labels)), frameon=False
    )
    fig.tight_layout(rect=(0, 0.04 + 0.045 * math.ceil(len(labels) / 3), 1, 1))
    return fig


@dataclass
class Reliability:
    """Pooled reliability bins of one part (in-domain or shifted) of one condition."""

    part: str
    colour: str
    accuracy: np.ndarray
    confidence: np.ndarray
    count: np.ndarray
    legend: str


def reliability(panels: list[tuple[str, list[Reliability]]], n_bins: int):
    """Accuracy against confidence per panel, and below it the number of cases in each bin."""
    plt = pyplot()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = plt.figure(figsize=(3.3 * cols, 3.9 * rows))
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1.1] * rows)
    edges = np.linspace(0, 1, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = 1 / n_bins
    for i, (title, parts) in enumerate(panels):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        axn = fig.add_subplot(grid[2 * r + 1, c], sharex=ax)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for j, p in enumerate(parts):
            used = p.count > 0
            off = (j - (len(parts) - 1) / 2) * width / len(parts)
            ax.bar(
                centres[used] + off,
                p.accuracy[used],
                width / len(parts),
                alpha=0.75,
                color=p.colour,
                label=p.legend,
            )
            axn.bar(centres + off, p.count, width / len(parts), color=p.colour, alpha=0.7)
            for x, n in zip(centres + off, p.count, strict=True):
                if n > 0:
                    axn.text(x, n, f"{int(n)}", ha="center", va="bottom", fontsize=5, rotation=90)
        ax.set_title(title, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.legend(fontsize=6.5, loc="upper left", frameon=False)
        ax.tick_params(labelbottom=False)
        axn.set_yscale("symlog", linthresh=1)
        axn.set_ylabel("cases", fontsize=7)
        axn.set_xlabel(f"confidence ({n_bins} equal-width bins)", fontsize=8)
        axn.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def risk_coverage(
    title: str,
    curves_: list[tuple[str, Style, np.ndarray, np.ndarray]],
    target_error: float | None,
):
    """Selective risk against coverage, one step curve per condition."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 3.9))
    for label, style, cov, risk in curves_:
        ax.step(cov, risk, where="post", color=style.colour, linestyle=style.linestyle, label=label)
    if target_error is not None:
        ax.axhline(
            target_error, color="#555", lw=0.8, ls=":", label=f"target error {target_error:g}"
        )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("coverage (fraction of cases answered, most confident first)", fontsize=8)
    ax.set_ylabel("error on the answered cases", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def stream_traces(panels: list[tuple[str, list[tuple[str, list, list, list]]]]):
    """Per panel (title, lines of (test set, positions, entropy, reset positions))."""
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols + 1.5, 2.8 * rows + 0.3), squeeze=False
    )
    for ax, (title, lines) in zip(axes.flat, panels, strict=False):
        for name, pos, ent, resets in lines:
            line = ax.plot(pos, ent, lw=1.1, label=name)[0]
            for p in resets:
                ax.axvline(p, color="#d62728", lw=0.8, ymax=0.08)
            line.set_alpha(0.9)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("position in the stream (images)", fontsize=8)
        ax.set_ylabel("entropy / ln K", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right", frameon=False, ncol=2)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig
