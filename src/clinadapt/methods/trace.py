"""What a test-time method did along a stream: one row per batch, events, a summary, warnings.

A row holds the collapse monitor's reading of the batch's predictions (``entropy``: mean
H / ln K of the batch; ``diversity``: entropy of the predicted-class histogram over the
monitor's window / ln K; ``top_share``: share of that window in its most frequent class;
``collapse``: 1 when the window looks collapsed) and what the method did (``used``: samples in
the loss of the last update, after the method's filters; ``reliable``: samples past its entropy
filter; ``updates``: optimiser steps taken; ``loss``; ``recovery``: 1 when the method's own
reset rule fired, SAR's; ``reset``: 1 when the model went back to the source because the collapse
guard (``guard=reset``) or a non-finite output asked). ``None`` where a method has no such
notion (``bn`` has no filter).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger("clinadapt.tta")

TRACE_COLUMNS = (
    "position",
    "size",
    "entropy",
    "diversity",
    "top_share",
    "collapse",
    "used",
    "reliable",
    "updates",
    "loss",
    "recovery",
    "reset",
)
#: a mechanism "fires on most batches" above this share of a stream's batches
MOST = 0.5
MAX_EVENTS = 100


@dataclass
class StreamResult:
    """Probabilities of one stream in its order, and what the method did on the way.

    ``trace`` is empty for methods that keep no per-batch account (the protocol then fills the
    collapse monitor's columns from ``probs``); ``info`` holds the method's own figures for the
    stream it was called on (under the episodic protocol those of the last episode, under the
    continual one those of the whole stream); ``updates_per_image`` in it fills the trace's
    ``updates`` for methods that adapt image by image (TPT).
    """

    probs: np.ndarray
    trace: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, probs: torch.Tensor | np.ndarray, **info: Any) -> StreamResult:
        """A result with probabilities only (as float64 numpy) and optional info."""
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().cpu().numpy()
        return cls(np.asarray(probs, dtype=np.float64), info=dict(info))

    @classmethod
    def concat(cls, parts: list[StreamResult]) -> StreamResult:
        """One result from consecutive parts of a stream (positions shifted)."""
        out = cls(np.concatenate([p.probs for p in parts]), info=dict(parts[-1].info))
        offset = 0
        for p in parts:
            out.trace += [{**r, "position": r["position"] + offset} for r in p.trace]
            out.events += [{**e, "position": e["position"] + offset} for e in p.events]
            offset += len(p.probs)
        return out

    def split(self, bounds: np.ndarray) -> list[StreamResult]:
        """Parts of this result between consecutive ``bounds`` (rows by their first image)."""
        parts = []
        for lo, hi in itertools.pairwise(bounds):
            parts.append(
                StreamResult(
                    self.probs[lo:hi],
                    [
                        {**r, "position": r["position"] - lo}
                        for r in self.trace
                        if lo <= r["position"] < hi
                    ],
                    [
                        {**e, "position": e["position"] - lo}
                        for e in self.events
                        if lo <= e["position"] < hi
                    ],
                    dict(self.info),
                )
            )
        return parts


def columns(trace: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The trace as columns (the record's form; one CSV column each)."""
    return {c: [_round(r.get(c)) for r in trace] for c in TRACE_COLUMNS}


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


def summarise(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over one stream's trace: what the method did, how often each mechanism fired."""
    images = sum(r["size"] for r in trace)
    used = [r["used"] for r in trace if r.get("used") is not None]
    reliable = [r["reliable"] for r in trace if r.get("reliable") is not None]
    return {
        "images": images,
        "batches": len(trace),
        "updates": int(sum(r["updates"] for r in trace if r.get("updates") is not None))
        if any(r.get("updates") is not None for r in trace)
        else None,
        "batches_with_samples_used": sum(1 for u in used if u > 0) if used else None,
        "used_per_batch": float(np.mean(used)) if used else None,
        "used_fraction": sum(used) / images if used and images else None,
        "reliable_fraction": sum(reliable) / images if reliable and images else None,
        "recoveries": int(sum(r.get("recovery") or 0 for r in trace)),
        "resets": int(sum(r.get("reset") or 0 for r in trace)),
        "collapse_batches": int(sum(r.get("collapse") or 0 for r in trace)),
        "would_be_resets": int(sum(1 for r in trace if r.get("collapse") and not r.get("reset"))),
        "mean_entropy": float(np.mean([r["entropy"] for r in trace])) if trace else None,
        "final_diversity": trace[-1]["diversity"] if trace else None,
    }


def warnings_for(method: str, name: str, s: dict[str, Any], guarded: bool) -> list[str]:
    """Say when a mechanism fired on most batches, or a collapse was seen but not acted on."""
    out = []
    b = s["batches"]
    if b and s["recoveries"] > MOST * b:
        out.append(
            f"{method} on {name}: its own recovery reset the model on {s['recoveries']} of {b} "
            "batches, so it mostly predicts with the freshly reset source model (for BatchNorm "
            "models: as episodic bn); a class-count-aware reset threshold may be an option"
        )
    used = s["batches_with_samples_used"]
    if used is not None and b and used < MOST * b:
        share = s["used_fraction"] or 0.0
        out.append(
            f"{method} on {name}: its filters let samples into the update on only {used} of {b} "
            f"batches ({share:.1%} of the images), so it mostly acts as its normalisation alone "
            "(for BatchNorm models: as bn)"
        )
    if s["would_be_resets"]:
        hint = "; method_options.guard=reset resets the model then" if guarded else ""
        out.append(
            f"{method} on {name}: the collapse monitor flagged {s['would_be_resets']} of {b} "
            f"batches (low entropy, one class dominating its window){hint}"
        )
    return out


#: adapted and source probabilities closer than this on every image count as "unchanged"
UNCHANGED_ATOL = 1e-6


def unchanged_warnings(
    method: str,
    info: dict[str, Any],
    probs: dict[str, np.ndarray],
    source_probs: dict[str, np.ndarray],
) -> list[str]:
    """Say where a method that updated the model left every prediction of its unadapted source
    as it was (same images, same order). The usual cause: the set was a single stream batch,
    and methods that predict each batch before the update it drives (Tent, EATA, SAR, ...) then
    show nothing of their updates, only what acts within the batch (batch statistics)."""
    out = []
    for name, source in source_probs.items():
        s = info.get("per_set", {}).get(name, {})
        updates = s.get("updates")
        adapted = probs.get(name)
        if not updates or adapted is None or adapted.shape != source.shape:
            continue
        if np.abs(adapted - source).max(initial=0.0) > UNCHANGED_ATOL:
            continue
        text = (
            f"{method} on {name}: every prediction equals the unadapted source's although it "
            f"made {updates} update(s)"
        )
        size = info.get("stream_batch_size")
        if s.get("batches") == 1 and info.get("protocol") != "continual":
            text += (
                f"; the set was one stream batch ({len(source)} images, stream_batch_size {size})"
                " and each batch is predicted before the update it drives, so no update reached "
                "a prediction: set a smaller stream_batch_size"
            )
        out.append(text)
    return out
