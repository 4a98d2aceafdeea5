"""Run one experiment end to end and write its result record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from datetime import UTC, datetime
from importlib import metadata
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
from clinadapt.evaluation.subgroups import lower_is_better
from clinadapt.methods import METHODS, Context, FitMethod, Method, TTAMethod, predict_proba
from clinadapt.methods.tta.protocol import order_stream, run_tta, source_method_for
from clinadapt.models import load_model
from clinadapt.progress import status
from clinadapt.shifts import ShiftSplit, apply_shift
from clinadapt.targets import (
    TargetInfo,
    apply_target,
    enable_adaptive_temperature,
    save_adapted,
)
from clinadapt.tasks.base import Outcome, task_for

PACKAGES = (
    "clinadapt",
    "torch",
    "torchvision",
    "timm",
    "open_clip_torch",
    "transformers",
    "peft",
    "numpy",
    "scikit-learn",
)
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


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
) -> tuple[ImageClassifier, TargetInfo, dict[str, Any]]:
    """Train (or reload from the run cache) a classifier with a fit method.

    ``target=None`` uses the method's own default target.
    """
    method = METHODS.get(method_name)()
    if not isinstance(method, FitMethod):
        raise ConfigError(
            f"{method_name!r} is a test-time method; the source must be trained by a fit method"
        )
    opts = method.parse_options(options)
    target = target or method.default_target
    model = build_classifier(cfg, split.train.num_classes, split.train.class_names)
    info = apply_target(model, target, cfg.target_options if method_name == cfg.method else None)
    # domain-adaptation methods (dapl) also see the shifted test images, without labels
    unlabelled = unlabelled_targets(split) if getattr(method, "uses_unlabelled", False) else {}
    if unlabelled:
        ctx = dataclasses.replace(ctx, unlabelled=unlabelled)
    key = _fit_key(cfg, method_name, target, opts.model_dump(), split.train, unlabelled)
    ckpt = Path(cfg.out_dir) / "cache" / f"fit-{key}.safetensors"
    if ckpt.exists():
        status(f"reusing trained model {ckpt.name}")
        method.load_adapted(model, load_file(str(ckpt), device=cfg.device))
        return model, info, {"reused": ckpt.name}
    status(
        f"training {cfg.model} with {method_name} on {split.train.name} ({len(split.train)} images, target {target})"
    )
    summary = method.fit(model, split.train, split.val, opts, ctx)
    save_adapted(model, ckpt, base=cfg.model, target=info)
    summary["checkpoint"] = ckpt.name
    return model, info, summary


def summarise(
    metrics: dict[str, dict[str, float]],
    in_domain: list[str],
    names: tuple[str, ...] | list[str] = SUMMARY_METRICS,
) -> dict[str, Any]:
    """In-domain and shifted means, and the worst test set, for the headline metrics ``names``."""
    out: dict[str, Any] = {}
    shifted = [k for k in metrics if k not in in_domain]
    for m in names:
        vals = {k: v[m] for k, v in metrics.items() if m in v and v[m] == v[m]}
        if not vals:
            continue
        worst = (max if lower_is_better(m) else min)(vals, key=vals.get)
        out[m] = {
            "in_domain": float(np.mean([vals[k] for k in in_domain if k in vals]))
            if any(k in vals for k in in_domain)
            else None,
            "shifted": float(np.mean([vals[k] for k in shifted if k in vals]))
            if any(k in vals for k in shifted)
            else None,
            "worst": vals[worst],
            "worst_set": worst,
        }
    return out


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
    record: dict[str, Any] = {}
    probs: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, np.ndarray]] = {}
    val_pred: tuple[np.ndarray, np.ndarray] | None = None
    if isinstance(method, FitMethod):
        target = cfg.target or method.default_target
        model, info, summary = fit_source(cfg, split, cfg.method, target, cfg.method_options, ctx)
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        record["adaptive_temperature"] = _adaptive_temperature(cfg, model, ds.task)
        for name, test in split.tests.items():
            probs[name] = predict_proba(model, test, ctx, desc=f"evaluate {name}")
            labels[name] = test.labels
            meta[name] = test.metadata
        if ds.task == "binary" and split.val is not None:  # operating point chosen on validation
            val_pred = (split.val.labels, predict_proba(model, split.val, ctx, desc="validation"))
        record["training"] = summary
    elif isinstance(method, TTAMethod):
        opts = method.parse_options(cfg.method_options)
        src_method = source_method_for(method, cfg.source.method)
        model, src_info, summary = fit_source(
            cfg, split, src_method, cfg.source.target, cfg.source.options, ctx
        )
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        target = cfg.target or method.default_target
        info = src_info if target == "none" else apply_target(model, target, cfg.target_options)
        record["adaptive_temperature"] = _adaptive_temperature(cfg, model, ds.task)
        if ds.task == "binary" and split.val is not None:  # the source's operating point
            val_pred = (split.val.labels, predict_proba(model, split.val, ctx, desc="validation"))
        result = run_tta(
            method,
            model,
            split.tests,
            opts,
            ctx,
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
        record["tta"] = result.info
        record["source"] = {
            **cfg.source.model_dump(),
            "method": src_method,
            "training": summary,
            "target": src_info.to_dict(),
        }
    else:  # pragma: no cover - the registry only holds the two kinds
        raise ConfigError(f"method {cfg.method!r} is of unknown kind")
    timings["evaluate_s"] = time.perf_counter() - t
    return Outcome(
        model=model.encoder.describe(),
        target=info.to_dict(),
        method={
            "name": cfg.method,
            "kind": method.kind,
            "options": method.parse_options(cfg.method_options).model_dump(),
        },
        predictions={"probs": probs, "labels": labels, "meta": meta, "val": val_pred},
        parts=record,
    )


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
    metrics = {name: e["metrics"] for name, e in evals.items()}
    timings["metrics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    run_id = cfg.run_id()
    record = {
        "schema": 1,
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model_dump(),
        "seed": cfg.seed,
        "versions": versions(),
        "task": task.name,
        "data": {**ds.summary(), "class_names": ds.class_names},
        "shift": split.describe(),
        "model": outcome.model,
        "target": outcome.target,
        "method": outcome.method,
        **outcome.parts,
        "metrics": metrics,
        "summary": summarise(metrics, split.in_domain, task.summary_metrics),
        **{
            part: {name: e[part] for name, e in evals.items() if part in e}
            for part in task.evaluation_parts
            if any(part in e for e in evals.values())
        },
        "timings": timings,
        "status": "ok",
    }
    if write:
        task.write(cfg.out_dir, record, outcome)
    return record
