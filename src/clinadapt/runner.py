"""Run one experiment end to end and write its result record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from clinadapt.classifier import ImageClassifier
from clinadapt.config import RunConfig
from clinadapt.data import load_dataset
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.methods import METHODS, Context, FitMethod, Method, TTAMethod, predict_proba
from clinadapt.methods.budget import LabelledBudget
from clinadapt.methods.tta.protocol import order_stream, run_tta, source_method_for
from clinadapt.models import load_model
from clinadapt.progress import status
from clinadapt.record import build_record, summarise, versions
from clinadapt.shifts import ShiftSplit, apply_shift
from clinadapt.targets import (
    TargetInfo,
    apply_target,
    enable_adaptive_temperature,
    save_adapted,
)
from clinadapt.tasks.base import Outcome, task_for


def build_classifier(
    cfg: RunConfig, num_classes: int, class_names: list[str] | None = None
) -> ImageClassifier:
    """The backbone of ``cfg`` with a fresh head, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    encoder = load_model(
        cfg.model, weights=cfg.weights, pretrained=cfg.pretrained, **cfg.model_options
    )
    return ImageClassifier(encoder, num_classes, class_names).to(cfg.device)


def unlabelled_targets(split: ShiftSplit) -> dict[str, ClinicalDataset]:
    """The shifted test sets with their labels hidden (all 0), for domain-adaptation methods.

    This is the transductive protocol of unsupervised domain adaptation: the target images are
    seen without labels during training and then evaluated.
    """
    out = {}
    for name, test in split.tests.items():
        if name in split.in_domain:
            continue
        hidden = test.subset(np.arange(len(test)), name=f"{test.name} (unlabelled)")
        hidden.labels = np.zeros_like(hidden.labels)
        out[name] = hidden
    return out


def _fit_key(
    cfg: RunConfig,
    method: str,
    target: str,
    options: dict,
    train: ClinicalDataset,
    unlabelled: dict[str, ClinicalDataset] | None = None,
) -> str:
    ident = {
        "model": cfg.model,
        "weights": cfg.weights,
        "pretrained": cfg.pretrained,
        "model_options": cfg.model_options,
        "method": method,
        "target": target,
        "target_options": cfg.target_options if method == cfg.method else {},
        "options": options,
        "train": train.fingerprint(),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
    }
    if unlabelled:
        ident["unlabelled"] = {k: v.fingerprint() for k, v in sorted(unlabelled.items())}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _adaptive_temperature(cfg: RunConfig, model: ImageClassifier, task: str) -> dict | None:
    """Switch on adaptive temperature for evaluation when ``cfg`` asks; say what changed."""
    if not cfg.adaptive_temperature:
        return None
    # the entropy-based beta is defined for a softmax, not for multi-label sigmoids
    return enable_adaptive_temperature(model, output=task != "multilabel").to_dict()


def fit_source(
    cfg: RunConfig,
    split: ShiftSplit,
    method_name: str,
    target: str | None,
    options: dict,
    ctx: Context,
) -> tuple[ImageClassifier, TargetInfo, dict[str, Any], LabelledBudget]:
    """Train (or reload from the run cache) a classifier with a fit method.

    ``target=None`` uses the method's own default target. The method is given only the
    labelled images its budget allows (K per class in K-shot runs), which are returned too.
    """
    method = METHODS.get(method_name)()
    if not isinstance(method, FitMethod):
        raise ConfigError(
            f"{method_name!r} is a test-time method; the source must be trained by a fit method"
        )
    opts = method.parse_options(options)
    if method.reads_labels:
        split.train.require_classes()
    target = target or method.default_target
    model = build_classifier(cfg, split.train.num_classes, split.train.class_names)
    info = apply_target(model, target, cfg.target_options if method_name == cfg.method else None)
    # domain-adaptation methods (dapl) also see the shifted test images, without labels
    unlabelled = unlabelled_targets(split) if method.uses_unlabelled else {}
    if unlabelled:
        ctx = dataclasses.replace(ctx, unlabelled=unlabelled)
    budget = method.labelled_budget(split.train, split.val, opts, ctx.seed)
    key = _fit_key(cfg, method_name, target, opts.model_dump(), split.train, unlabelled)
    ckpt = Path(cfg.out_dir) / "cache" / f"fit-{key}.safetensors"
    if ckpt.exists():
        status(f"reusing trained model {ckpt.name}")
        method.load_adapted(model, load_file(str(ckpt), device=cfg.device))
        return model, info, {"reused": ckpt.name}, budget
    status(
        f"training {cfg.model} with {method_name} on {budget.train.name} "
        f"({len(budget.train)} images, target {target})"
    )
    summary = method.fit(model, budget.train, budget.val, opts, ctx)
    save_adapted(model, ckpt, base=cfg.model, target=info)
    summary["checkpoint"] = ckpt.name
    return model, info, summary, budget


def _operating_point_data(
    model: ImageClassifier, budget: LabelledBudget, task: str, ctx: Context
) -> tuple[np.ndarray, np.ndarray] | None:
    """Validation (labels, probabilities) to choose a binary operating point on.

    Only the validation images of the fit's budget: none in K-shot runs that select on the
    support set or not at all, so their operating point is 0.5 (and the record says so).
    """
    if task != "binary" or budget.val is None:
        return None
    return budget.val.labels, predict_proba(model, budget.val, ctx, desc="validation")


def classification_outcome(
    cfg: RunConfig,
    method: Method,
    split: ShiftSplit,
    ctx: Context,
    timings: dict[str, float],
) -> Outcome:
    """Classification's run: fit (or fit a source and adapt on the test streams) and predict."""
    ds = split.train
    t = time.perf_counter()
    parts: dict[str, Any] = {}
    probs: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, np.ndarray]] = {}
    val_pred: tuple[np.ndarray, np.ndarray] | None = None
    source_probs: dict[str, np.ndarray] = {}
    if isinstance(method, FitMethod):
        target = cfg.target or method.default_target
        model, info, summary, budget = fit_source(
            cfg, split, cfg.method, target, cfg.method_options, ctx
        )
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        parts["adaptive_temperature"] = _adaptive_temperature(cfg, model, ds.task)
        for name, test in split.tests.items():
            probs[name] = predict_proba(model, test, ctx, desc=f"evaluate {name}")
            labels[name] = test.labels
            meta[name] = test.metadata
        val_pred = _operating_point_data(model, budget, ds.task, ctx)
        parts["training"] = summary
        parts["labelled"] = budget.describe()
    elif isinstance(method, TTAMethod):
        opts = method.parse_options(cfg.method_options)
        src_method = source_method_for(method, cfg.source.method)
        model, src_info, summary, budget = fit_source(
            cfg, split, src_method, cfg.source.target, cfg.source.options, ctx
        )
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        target = cfg.target or method.default_target
        if target == "none":  # the method moves no parameter of the source model
            info = TargetInfo(spec="none", trainable=0, total=src_info.total)
        else:
            info = apply_target(model, target, cfg.target_options)
        parts["adaptive_temperature"] = _adaptive_temperature(cfg, model, ds.task)
        val_pred = _operating_point_data(model, budget, ds.task, ctx)  # the source's
        result = run_tta(
            method,
            model,
            split.tests,
            opts,
            dataclasses.replace(ctx, batch_size=cfg.stream_batch_size),
            protocol=cfg.tta_protocol,
            order=cfg.stream_order,
            source=split.val if split.val is not None else split.train,
        )
        for name, p in result.probs.items():
            n = len(result.labels[name])
            if p.shape != (n, split.tests[name].num_classes):
                raise IncompatibleError(f"{cfg.method} returned {p.shape} for {n} images")
        probs, labels = result.probs, result.labels
        for name, test in split.tests.items():  # metadata in the stream's order, for subgroups
            stream = order_stream(test, cfg.stream_order, cfg.seed)
            if np.array_equal(stream.labels, labels[name]):
                meta[name] = stream.metadata
                if cfg.method != "source":  # the unadapted model on the same stream
                    source_probs[name] = predict_proba(model, stream, ctx, f"source {name}")
        parts["tta"] = result.info
        parts["source"] = {
            **cfg.source.model_dump(),
            "method": src_method,
            "training": summary,
            "labelled": budget.describe(),
            "target": target_record(src_info, METHODS.get(src_method)()),
        }
    else:  # pragma: no cover - the registry only holds the two kinds
        raise ConfigError(f"method {cfg.method!r} is of unknown kind")
    timings["evaluate_s"] = time.perf_counter() - t
    return Outcome(
        model=model.encoder.describe(),
        target=target_record(info, method),
        method={
            "name": cfg.method,
            "kind": method.kind,
            "options": method.parse_options(cfg.method_options).model_dump(),
        },
        predictions={
            "probs": probs,
            "labels": labels,
            "meta": meta,
            "val": val_pred,
            "source_probs": source_probs,
        },
        parts=parts,
    )


def target_record(info: TargetInfo, method: Method) -> dict[str, Any]:
    """The record's ``target``: what the method changed, and how many parameters it trained.

    A method that trains no parameter (bn re-estimates normalisation statistics, zero-shot sets
    its head from text) records target ``none``, 0 trainable, and its ``changes``.
    """
    if method.changes is not None:
        info = TargetInfo(spec="none", trainable=0, total=info.total)
        return {**info.to_dict(), "changes": method.changes}
    if info.trainable == 0:
        return {**info.to_dict(), "changes": "nothing"}
    return {**info.to_dict(), "changes": f"the parameters of target {info.spec}"}


def run_experiment(cfg: RunConfig, write: bool = True) -> dict[str, Any]:
    """Run ``cfg`` and return its result record (also written to ``cfg.out_dir`` when ``write``).

    The task comes from the dataset (classification or segmentation): it builds the predictor,
    fits or adapts it, predicts and evaluates every test set; the record is the same for all.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    method = METHODS.get(cfg.method)()
    ctx = Context(
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        cache_dir=str(Path(cfg.out_dir) / "cache" / "features"),
    )

    ds = load_dataset(cfg.data, **cfg.data_options)
    split = apply_shift(ds, cfg.shift, seed=cfg.seed, **cfg.shift_options)
    task = task_for(ds)
    task.check(method, ds)
    timings["data_s"] = time.perf_counter() - t0

    outcome = task.run(cfg, method, split, ctx, timings)

    t = time.perf_counter()
    evals = task.evaluate(outcome, split, cfg)
    timings["metrics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    record = build_record(
        cfg,
        task=task,
        data=ds,
        split=split,
        model=outcome.model,
        target=outcome.target,
        method=outcome.method,
        evaluations=evals,
        timings=timings,
        **outcome.parts,
    ).to_dict()
    if write:
        task.write(cfg.out_dir, record, outcome)
    return record


__all__ = ["build_classifier", "fit_source", "run_experiment", "summarise", "versions"]
