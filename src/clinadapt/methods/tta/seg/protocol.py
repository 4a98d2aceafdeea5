"""Segmentation test streams under the classification TTA protocols.

``per-shift`` (each test set one stream from a fresh source model), ``episodic`` (reset after
every batch) and ``continual`` (one stream through all test sets, never reset) mean what they mean
for classification (methods/tta/protocol.py), with ``ctx.batch_size`` images per step (1 gives
single-image streams). Stream orders: ``random`` (seeded), or ``size-sorted`` (ascending total
reference area, so empty images come first: a drift in what the stream holds). The (C, H, W)
class masks come back in each test set's own order, whatever the stream order, so they line up
with the references for evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError
from clinadapt.methods.base import Context, Options
from clinadapt.methods.trace import MAX_EVENTS
from clinadapt.methods.tta.protocol import PROTOCOLS
from clinadapt.methods.tta.seg.base import SegTTAMethod
from clinadapt.segmentation.predict import MaskModel
from clinadapt.segmentation.prompts import Prompts

SEG_ORDERS: tuple[str, ...] = ("random", "size-sorted")


@dataclass
class SegTTAResult:
    """(C, H, W) class masks per test set (in the set's order) and what happened on the way."""

    masks: dict[str, list[np.ndarray]]
    info: dict[str, Any] = field(default_factory=dict)


def stream_positions(ds: Any, order: str, seed: int) -> np.ndarray:
    """Positions of ``ds`` in stream order."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ds))
    if order == "random":
        return perm
    if order == "size-sorted":
        total = np.asarray(ds.areas).sum(1)[perm]
        return perm[np.argsort(total, kind="stable")]
    raise ConfigError(
        f"stream order {order!r} is not defined for segmentation; choose one of {SEG_ORDERS}"
    )


def run_seg_tta(
    method: SegTTAMethod,
    model: MaskModel,
    tests: Mapping[str, Any],
    prompts: Mapping[str, Sequence[Prompts]],
    options: Options,
    ctx: Context,
    protocol: str = "per-shift",
    order: str = "random",
) -> SegTTAResult:
    """Stream every test set through ``method`` under ``protocol``; count resets per set."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown TTA protocol {protocol!r}; choose one of {PROTOCOLS}")
    missing = [n for n in tests if n not in prompts or len(prompts[n]) != len(tests[n])]
    if missing:
        raise ConfigError(f"no prompts (one set per image) for test set(s) {missing}")
    positions = {n: stream_positions(ds, order, ctx.seed) for n, ds in tests.items()}
    streams = {n: ds.subset(positions[n], name=ds.name) for n, ds in tests.items()}
    stream_prompts = {n: [prompts[n][int(j)] for j in positions[n]] for n in tests}
    events: dict[str, list[dict[str, Any]]] = {n: [] for n in streams}
    in_stream: dict[str, list[np.ndarray]] = {}
    if protocol == "continual":
        names = list(streams)
        whole = ClinicalDataset.concat([streams[n] for n in names], name="continual")
        joined = [p for n in names for p in stream_prompts[n]]
        res = method.adapt_masks(model, whole, joined, options, ctx)
        bounds = np.cumsum([0] + [len(streams[n]) for n in names])
        for i, n in enumerate(names):
            in_stream[n] = res.masks[bounds[i] : bounds[i + 1]]
        for e in res.events:
            n = names[int(np.searchsorted(bounds, e["position"], side="right")) - 1]
            events[n].append(e)
    else:
        for n, stream in streams.items():
            if protocol == "per-shift":
                res = method.adapt_masks(model, stream, stream_prompts[n], options, ctx)
                in_stream[n], events[n] = res.masks, res.events
            else:  # episodic: every batch from the source model
                in_stream[n] = []
                for s in range(0, len(stream), ctx.batch_size):
                    part = np.arange(s, min(s + ctx.batch_size, len(stream)))
                    res = method.adapt_masks(
                        model,
                        stream.subset(part),
                        [stream_prompts[n][int(j)] for j in part],
                        options,
                        ctx,
                    )
                    in_stream[n] += res.masks
                    events[n] += [{**e, "position": e["position"] + s} for e in res.events]
    resets = {n: sum(e["kind"] == "reset" for e in ev) for n, ev in events.items()}
    would = {n: sum(e["kind"] == "would-reset" for e in ev) for n, ev in events.items()}
    masks: dict[str, list[np.ndarray]] = {}
    for n, maps in in_stream.items():
        back: list[np.ndarray | None] = [None] * len(maps)
        for j, pos in enumerate(positions[n]):
            back[int(pos)] = maps[j]
        masks[n] = back  # type: ignore[assignment]
    info = {
        "protocol": protocol,
        "stream_order": order,
        "batch_size": ctx.batch_size,
        "guard": getattr(options, "guard", None),
        "resets": int(sum(resets.values())),
        "resets_per_set": resets,
        "would_be_resets": int(sum(would.values())),
        "would_be_resets_per_set": would,
        "reset_events": [e for ev in events.values() for e in ev][:MAX_EVENTS],
        "stream_sizes": {n: len(s) for n, s in streams.items()},
    }
    return SegTTAResult(masks, info)
