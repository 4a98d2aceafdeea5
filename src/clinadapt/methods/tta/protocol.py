"""How test streams are formed and when a test-time method starts again from the source model.

Protocols (``RunConfig.tta_protocol``):

- ``per-shift`` (default): each test set is one stream, adapted from a fresh copy of the source.
- ``episodic``: every batch starts again from the source model (no memory between batches).
- ``continual``: one stream runs through all test sets in sequence, never reset.

Orders (``RunConfig.stream_order``), i.e. label-prevalence shift inside a stream:

- ``random``: a seeded permutation, as a clinic would see patients.
- ``class-sorted``: all images of class 0, then class 1, ... (a seeded order within a class).
- ``imbalanced``: a long-tailed subsample, class k kept with frequency ratio**(-k/(K-1)) of the
  largest (ratio 10), in random order.

Streams that start from the source model (one per test set under ``per-shift`` and
``episodic``) are independent: ``RunConfig.stream_executor="ray"`` adapts them as parallel Ray
tasks, each stream still in order, with the same results as one after another.

The stream's batch size is ``ctx.batch_size`` (``RunConfig.stream_batch_size``); 1 gives
single-sample streams, and BatchNorm methods then blend the source statistics in (see
``methods/tta/bn.py``). Any :class:`TTAMethod` works with every protocol: the protocol only
decides which streams ``adapt`` is called on, and ``adapt`` never changes the model it is given.
``TTAMethod.prepare`` is called once before the streams with labelled source images (the
validation split; EATA estimates its Fisher information there). What each method did (a
per-batch trace of the collapse monitor and of its updates, its resets and recoveries) comes back
from ``adapt`` and is reported per test set, with a warning when a mechanism fired on most
batches.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.methods.base import Context, Options, TTAMethod
from clinadapt.methods.trace import (
    MAX_EVENTS,
    StreamResult,
    columns,
    log,
    summarise,
    warnings_for,
)
from clinadapt.methods.tta.guard import CollapseGuard

Protocol = Literal["per-shift", "episodic", "continual"]
StreamOrder = Literal["random", "class-sorted", "imbalanced"]
PROTOCOLS: tuple[str, ...] = ("per-shift", "episodic", "continual")
ORDERS: tuple[str, ...] = ("random", "class-sorted", "imbalanced")
EXECUTORS: tuple[str, ...] = ("local", "ray")
IMBALANCE_RATIO = 10.0


@dataclass
class TTAResult:
    """Probabilities and labels per test set, in stream order, and what happened on the way."""

    probs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def order_stream(
    ds: ClinicalDataset, order: str, seed: int, ratio: float = IMBALANCE_RATIO
) -> ClinicalDataset:
    """``ds`` as a stream in the given order (``imbalanced`` also drops images)."""
    rng = np.random.default_rng(seed)
    if order == "random":
        return ds.subset(rng.permutation(len(ds)), name=ds.name)
    if ds.task == "multilabel":
        raise IncompatibleError(f"stream order {order!r} needs single-label data; {ds.name} is not")
    perm = rng.permutation(len(ds))
    if order == "class-sorted":
        return ds.subset(perm[np.argsort(ds.labels[perm], kind="stable")], name=ds.name)
    if order == "imbalanced":
        return ds.subset(imbalanced_positions(ds.labels, ds.num_classes, ratio, rng), name=ds.name)
    raise ConfigError(f"unknown stream order {order!r}; choose one of {ORDERS}")


def imbalanced_positions(
    labels: np.ndarray, num_classes: int, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Positions of a long-tailed subsample: class k at ratio**(-k/(K-1)) of the largest count."""
    counts = np.bincount(labels, minlength=num_classes)
    present = np.flatnonzero(counts)
    base = counts[present].min()
    keep = []
    for rank, k in enumerate(present):
        frac = ratio ** (-rank / max(1, len(present) - 1))
        n = max(1, round(base * frac))
        keep.append(rng.permutation(np.flatnonzero(labels == k))[:n])
    return rng.permutation(np.concatenate(keep))


def concat_streams(streams: list[ClinicalDataset], name: str) -> ClinicalDataset:
    """One stream made of ``streams`` in sequence (they must share one image source)."""
    first = streams[0]
    if any(s.source is not first.source for s in streams):
        raise IncompatibleError(
            "the continual protocol needs test sets drawn from one dataset (one image source)"
        )
    return first.concat(streams, name)


def run_tta(
    method: TTAMethod,
    model: ImageClassifier,
    tests: dict[str, ClinicalDataset],
    options: Options,
    ctx: Context,
    protocol: str = "per-shift",
    order: str = "random",
    source: ClinicalDataset | None = None,
    executor: str = "local",
) -> TTAResult:
    """Stream every test set through ``method`` under ``protocol``; account for each set.

    ``executor="ray"`` adapts the independent streams (one per test set under ``per-shift``
    and ``episodic``) as parallel Ray tasks, each still sequential, with the same results as
    one after another here (``continual`` is one stream and runs here).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown TTA protocol {protocol!r}; choose one of {PROTOCOLS}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown stream executor {executor!r}; choose one of {EXECUTORS}")
    streams = {name: order_stream(ds, order, ctx.seed) for name, ds in tests.items()}
    method.prepare(model, source, options, ctx)
    results: dict[str, StreamResult] = {}
    if protocol == "continual":
        names = list(streams)
        whole = concat_streams([streams[n] for n in names], name="continual")
        res = with_monitor(method.adapt(model, whole, options, ctx), whole.num_classes, ctx)
        bounds = np.cumsum([0] + [len(streams[n]) for n in names])
        results = dict(zip(names, res.split(bounds), strict=True))
    else:
        if executor == "ray" and len(streams) > 1:
            adapted = adapt_on_ray(method, model, streams, options, ctx, protocol)
        else:
            adapted = {
                name: adapt_stream(method, model, stream, options, ctx, protocol)
                for name, stream in streams.items()
            }
        for name, stream in streams.items():
            results[name] = with_monitor(adapted[name], stream.num_classes, ctx)
    return TTAResult(
        {n: r.probs for n, r in results.items()},
        {n: s.labels for n, s in streams.items()},
        account(method, options, results, protocol, order, ctx),
        {n: s.metadata for n, s in streams.items()},
    )


def adapt_stream(
    method: TTAMethod,
    model: ImageClassifier,
    stream: ClinicalDataset,
    options: Options,
    ctx: Context,
    protocol: str,
) -> StreamResult:
    """One independent stream: adapted from the source model (``per-shift``), or from the
    source model again at every batch (``episodic``)."""
    if protocol == "per-shift":
        return method.adapt(model, stream, options, ctx)
    chunks = range(0, len(stream), ctx.batch_size)
    return StreamResult.concat(
        [
            method.adapt(
                model,
                stream.subset(np.arange(s, min(s + ctx.batch_size, len(stream)))),
                options,
                ctx,
            )
            for s in chunks
        ]
    )


def adapt_on_ray(
    method: TTAMethod,
    model: ImageClassifier,
    streams: dict[str, ClinicalDataset],
    options: Options,
    ctx: Context,
    protocol: str,
) -> dict[str, StreamResult]:
    """Each stream as one Ray task (the method, its source model and options sent once)."""
    from clinadapt.ray_tasks import ray_session, run_tasks, task_gpus

    names = list(streams)
    out: dict[str, StreamResult] = {}

    def done(i: int, result: StreamResult | None, error: BaseException | None) -> None:
        if error is not None:
            raise IncompatibleError(
                f"{method.name}: the Ray task of stream {names[i]!r} failed: {error}"
            )
        out[names[i]] = result

    # the model travels on the CPU; each task moves it to its own device
    shared = (method, copy.deepcopy(model).cpu(), options, dataclasses.replace(ctx, encoder=None))
    with ray_session(what="stream_executor=ray") as ray:
        run_tasks(
            _adapt_task,
            [(streams[n], protocol) for n in names],
            done,
            gpus=task_gpus(ray, ctx.device, None),
            shared=shared,
        )
    return {n: out[n] for n in names}


def _adapt_task(shared: tuple, stream: ClinicalDataset, protocol: str) -> StreamResult:
    method, model, options, ctx = shared
    if ctx.device.startswith("cuda"):  # the GPU Ray gave this task is its cuda:0
        ctx = dataclasses.replace(ctx, device="cuda")
    return adapt_stream(method, model.to(ctx.device), stream, options, ctx, protocol)


def with_monitor(res: StreamResult, num_classes: int, ctx: Context) -> StreamResult:
    """``res`` with a trace: a method that keeps none gets the collapse monitor's columns."""
    if res.trace:
        return res
    guard = CollapseGuard(num_classes)
    for start in range(0, len(res.probs), ctx.batch_size):
        probs = torch.as_tensor(res.probs[start : start + ctx.batch_size])
        reading = guard.observe(probs)
        res.trace.append(
            {
                "position": start,
                "size": len(probs),
                "entropy": reading.entropy,
                "diversity": reading.diversity,
                "top_share": reading.top_share,
                "collapse": int(reading.collapse is not None),
                "updates": res.info["updates_per_image"] * len(probs)
                if "updates_per_image" in res.info
                else None,
            }
        )
    return res


def account(
    method: TTAMethod,
    options: Options,
    results: dict[str, StreamResult],
    protocol: str,
    order: str,
    ctx: Context,
) -> dict[str, Any]:
    """The record's ``tta`` part: per-set summaries, totals, events, warnings and traces."""
    per_set = {n: {**summarise(r.trace), **r.info} for n, r in results.items()}
    guard = getattr(options, "guard", None)
    warnings = [
        w
        for n, s in per_set.items()
        for w in warnings_for(method.name, n, s, guarded=guard is not None)
    ]
    for w in warnings:
        log.info(w)
    if warnings:  # one line per run; every note is in the record
        log.warning(
            "%s: %d note(s) on what it did (record['tta']['warnings']), e.g. %s",
            method.name,
            len(warnings),
            warnings[0],
        )
    events = [e for r in results.values() for e in r.events]
    return {
        "protocol": protocol,
        "stream_order": order,
        "stream_batch_size": ctx.batch_size,
        "guard": guard,
        "resets": sum(s["resets"] for s in per_set.values()),
        "recoveries": sum(s["recoveries"] for s in per_set.values()),
        "would_be_resets": sum(s["would_be_resets"] for s in per_set.values()),
        "per_set": per_set,
        "warnings": warnings,
        "events": events[:MAX_EVENTS],
        "stream_sizes": {n: len(r.probs) for n, r in results.items()},
        "trace": {n: columns(r.trace) for n, r in results.items()},
    }


def source_method_for(method: TTAMethod, requested: str, default: str = "finetune") -> str:
    """The fit method that trains the source for ``method``.

    A test-time method that needs something learnt at source time (TTT++'s auxiliary branch and
    feature statistics) names its own fit method in ``source_method``; one that adapts only
    some kinds of source (TPT: a text prompt, so a zero-shot or CoOp source) lists them in
    ``source_methods``. The default ``source.method`` (finetune) is then read as the first of
    them, and any other choice is an error, before any training.
    """
    allowed = (method.source_method,) if method.source_method else method.source_methods
    if allowed is None or requested in allowed:
        return requested
    if requested == default:
        return allowed[0]
    why = " (finetune plus what it uses at test time)" if method.source_method else ""
    raise ConfigError(
        f"{method.name} needs its source trained by {' or '.join(map(repr, allowed))}{why}, not "
        f"{requested!r}: set source.method={allowed[0]}"
    )
