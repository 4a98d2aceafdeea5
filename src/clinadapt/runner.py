"""Run one experiment end to end and write its result record."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from clinadapt.classifier import ImageClassifier
from clinadapt.compute import check_precision, resolve_device
from clinadapt.compute import describe as describe_compute
from clinadapt.config import RunConfig
from clinadapt.data import load_dataset
from clinadapt.data.base import ClinicalDataset
from clinadapt.data.loading import keep_workers
from clinadapt.distributed import barrier, everyone
from clinadapt.distributed import init as join_processes
from clinadapt.distributed import world as process_world
from clinadapt.errors import ConfigError, DataError, IncompatibleError
from clinadapt.evaluation.events import write_tensorboard
from clinadapt.evaluation.tidy import run_tables
from clinadapt.fitted import classifier_metadata, load_fitted
from clinadapt.methods import METHODS, Context, FitMethod, Method, TTAMethod, predict_proba
from clinadapt.methods.base import check_single_label
from clinadapt.methods.budget import LabelledBudget
from clinadapt.methods.trace import unchanged_warnings
from clinadapt.methods.tta.protocol import order_stream, run_tta, source_method_for
from clinadapt.models import load_model
from clinadapt.models._weights import weights_fingerprint
from clinadapt.models.base import FoundationModel
from clinadapt.models.volume.base import check_spatial_dims
from clinadapt.preflight import check_run, check_subgroup_keys
from clinadapt.progress import status, status_once, warn
from clinadapt.record import build_record, summarise, versions
from clinadapt.shifts import ShiftSplit, apply_shift
from clinadapt.store import atomic_write_bytes, read_record, write_record
from clinadapt.targets import (
    TargetInfo,
    apply_target,
    enable_adaptive_temperature,
    save_adapted,
)
from clinadapt.tasks.base import Outcome, task_for


def invocation() -> str:
    """The command line of this process, for the record's provenance."""
    argv = list(sys.argv) or [""]
    head = Path(argv[0])
    if argv[0] in ("", "-c"):
        prog = ["python", *([argv[0]] if argv[0] else [])]
    elif head.name == "__main__.py":  # python -m package
        prog = ["python", "-m", head.parent.name]
    else:
        prog = [head.name]
    return shlex.join([*prog, *argv[1:]])


def build_classifier(
    cfg: RunConfig,
    num_classes: int,
    class_names: list[str] | None = None,
    encoder: FoundationModel | None = None,
) -> ImageClassifier:
    """The backbone of ``cfg`` (or a copy of ``encoder``) with a fresh head from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if encoder is not None:
        encoder = copy.deepcopy(encoder)
    else:
        encoder = load_model(
            cfg.model, weights=cfg.weights, pretrained=cfg.pretrained, **cfg.model_options
        )
    return ImageClassifier(encoder, num_classes, class_names).to(cfg.device)


def object_overrides(model: Any = None, data: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config fields naming ``model``/``data`` and the objects to use, for each given as an
    object (names pass through). An object is named with a digest of its weights or images, so
    a different object never reuses another's run id or cached fit."""
    from clinadapt.data.base import ClinicalDataset
    from clinadapt.models.base import FoundationModel

    names: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    if isinstance(model, FoundationModel):
        h = hashlib.sha256()
        for key, t in sorted(model.state_dict().items()):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}|{t.dtype}|{t.numel()}".encode())
            h.update(t.view(torch.uint8).numpy().data)
        names.update(model=model.name, weights=f"object:{h.hexdigest()[:16]}")
        names["model_options"] = dict(model.options) or None
        objects["encoder"] = model
    elif model is not None:
        if not isinstance(model, (str, os.PathLike)):
            raise ConfigError(
                f"model=: a model name or what clinadapt.load_model returns, not a "
                f"{_type_name(model)} (your own weights: clinadapt.load_model(NAME, "
                "weights=PATH); clinadapt models lists the names)"
            )
        names["model"] = str(model)
    if isinstance(data, ClinicalDataset):
        names["data"] = f"{data.name}@{data.fingerprint()[:12]}"
        objects["dataset"] = data
    elif data is not None:
        if not isinstance(data, (str, os.PathLike)):
            raise ConfigError(
                f"data=: a dataset name, a path (folder, CSV manifest, .npz, NIfTI) or what "
                f"clinadapt.load_dataset returns, not a {_type_name(data)}"
            )
        names["data"] = str(data)
    return names, objects


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")


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
    if cfg.precision != "fp32":  # a model trained at another precision is another model
        ident["precision"] = cfg.precision
    files = weights_fingerprint(cfg.weights)
    if files is not None:  # other weights at the same path (a resumed pre-training) retrain
        ident["weights_files"] = files
    if unlabelled:
        ident["unlabelled"] = {k: v.fingerprint() for k, v in sorted(unlabelled.items())}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _adaptive_temperature(cfg: RunConfig, model: ImageClassifier, task: str) -> dict | None:
    """Switch on adaptive temperature for evaluation when ``cfg`` asks; say what changed."""
    if not cfg.adaptive_temperature:
        return None
    # the entropy-based beta is defined for a softmax, not for multi-label sigmoids
    return enable_adaptive_temperature(model, output=task != "multilabel").to_dict()


def _fit_summary(path: Path) -> dict[str, Any]:
    """The training summary saved beside a cached fit (history, best epoch), if readable."""
    if not path.exists():
        return {}
    try:
        return read_record(path)
    except DataError as e:
        warn(f"{e}; the reused fit's training history is left out")
        return {}


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
    model = build_classifier(
        cfg, split.train.num_classes, split.train.class_names, encoder=ctx.encoder
    )
    check_spatial_dims(model.encoder, split.train.spatial_dims, split.train.name)
    target_options = cfg.target_options if method_name == cfg.method else None
    info = apply_target(model, target, target_options)
    # domain-adaptation methods (dapl) also see the shifted test images, without labels
    unlabelled = unlabelled_targets(split) if method.uses_unlabelled else {}
    ctx = dataclasses.replace(ctx, unlabelled=unlabelled, target=info)
    budget = method.labelled_budget(split.train, split.val, opts, ctx.seed)
    key = _fit_key(cfg, method_name, target, opts.model_dump(), split.train, unlabelled)
    ckpt = Path(cfg.out_dir) / "cache" / f"fit-{key}.safetensors"
    weights = f"cache/{ckpt.name}"  # the record's link to the fitted model, beside the record
    # under torchrun: all processes reuse the fit, or all train (each joins the same steps)
    if everyone(ckpt.exists()):
        if everyone(_load_fit(method, model, ckpt, cfg.device)):
            status_once(f"reusing trained model {ckpt.name}")
            saved = _fit_summary(ckpt.with_suffix(".json"))
            return model, info, {**saved, "reused": ckpt.name, "weights": weights}, budget
        # a damaged cache may have half-loaded: train from the same fresh start as always
        model = build_classifier(
            cfg, split.train.num_classes, split.train.class_names, encoder=ctx.encoder
        )
        info = apply_target(model, target, target_options)
        ctx = dataclasses.replace(ctx, target=info)
    status(
        f"training {cfg.model} with {method_name} on {budget.train.name} "
        f"({len(budget.train)} images, target {target})"
    )
    with keep_workers():  # loader workers start once, not at every epoch and validation pass
        summary = method.fit(model, budget.train, budget.val, opts, ctx)
    meta = classifier_metadata(model, method_name)
    summary["checkpoint"] = ckpt.name
    summary["weights"] = weights
    if process_world().main:  # under torchrun only process 0 writes
        save_adapted(model, ckpt, base=cfg.model, target=info, metadata=meta)
        write_record(ckpt.with_suffix(".json"), summary)
    barrier()  # the cache is there before any process looks for it again (a later run)
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


def source_from(
    cfg: RunConfig, split: ShiftSplit
) -> tuple[ImageClassifier, TargetInfo, str, dict[str, Any]]:
    """The fitted model ``cfg.source.from`` names (a record or adapted-weights file), checked
    against this run: same model, same classes in the same order."""
    fitted = load_fitted(cfg.source.from_, device=cfg.device)
    check_spatial_dims(fitted.model.encoder, split.train.spatial_dims, split.train.name)
    name = fitted.model.encoder.name
    if name != cfg.model:
        raise ConfigError(
            f"source.from {cfg.source.from_} holds a {name!r} model, but the run's model is "
            f"{cfg.model!r}; add --model {name}"
        )
    classes = list(split.train.class_names)
    if list(fitted.class_names) != classes:
        raise ConfigError(
            f"source.from {cfg.source.from_} classifies {fitted.class_names}, but {cfg.data} has "
            f"classes {classes}; the model and the data must name the same classes in order"
        )
    status(f"test-time adapting the model of {cfg.source.from_} (method {fitted.method})")
    return fitted.model, fitted.target, fitted.method, fitted.origin


def _load_fit(method: FitMethod, model: ImageClassifier, path: Path, device: str) -> bool:
    """Load a cached fit into ``model``; a damaged file is reported by name and trained again.

    Truncated or foreign files, tensors that do not fit and non-finite values (which would turn
    every prediction into NaN) all count as damaged.
    """
    try:
        state = load_file(str(path), device=device)
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise ValueError(f"non-finite values in {bad[:3]}")
        method.load_adapted(model, state)
    except Exception as e:
        warn(f"cached fit {path} is damaged ({type(e).__name__}: {e}); training again")
        return False
    return True


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
        if cfg.source.from_ is not None:
            raise ConfigError(
                f"source.from gives a test-time method its model; {cfg.method!r} trains its own. "
                "To evaluate the model as it is: --method source --set source.from=..."
            )
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
        origin = None
        if cfg.source.from_ is not None:  # a model fitted earlier, not trained here
            model, src_info, src_method, origin = source_from(cfg, split)
            summary: dict[str, Any] = {"from": origin}
            # nothing here trains: validation only places the binary operating point
            budget = LabelledBudget(split.train, split.val, None, "validation")
        else:
            check_single_label(method, split.train)  # before the source trains, not after
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
            executor=cfg.stream_executor,
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
        unchanged = unchanged_warnings(cfg.method, result.info, probs, source_probs)
        if unchanged:  # a run that silently equals its source: say so in the record and log
            result.info["warnings"] = [*result.info.get("warnings", []), *unchanged]
            warn(unchanged[0] + (f" (and {len(unchanged) - 1} more)" if len(unchanged) > 1 else ""))
        parts["source"] = {
            **cfg.source.model_dump(),
            "method": src_method,
            "training": summary,
            "labelled": budget.describe(),
            "target": target_record(src_info, METHODS.get(src_method)()),
        }
        if origin is not None:  # the link to the run (or file) the adapted model started from
            parts["source"]["from"] = origin
            parts["source"]["labelled"] = {"in": "the run it came from", **origin}
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


def write_run_tables(out_dir: str | Path, record: dict[str, Any]) -> None:
    """``<run_id>.history.csv`` and ``<run_id>.trace.csv`` next to the record, when it has them."""
    for suffix, text in run_tables(record).items():
        atomic_write_bytes(Path(out_dir) / f"{record['run_id']}.{suffix}", text.encode())


def run_experiment(
    cfg: RunConfig,
    write: bool = True,
    *,
    encoder: FoundationModel | None = None,
    dataset: ClinicalDataset | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` and return its result record (also written to ``cfg.out_dir`` when ``write``).

    The task comes from the dataset (classification or segmentation): it builds the predictor,
    fits or adapts it, predicts and evaluates every test set; the record is the same for all.
    """
    check_run(cfg, data=dataset is None)  # options, device, folder: before any data is read
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    requested = cfg.device
    device = resolve_device(requested)
    check_precision(cfg.precision, device)
    device = join_processes(device)  # under torchrun: this process's GPU, the process group
    cfg = cfg.model_copy(update={"device": device})
    method = METHODS.get(cfg.method)()
    world = process_world()
    if world.active:
        check_data_parallel(cfg, method)
    ctx = Context(
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        cache_dir=str(Path(cfg.out_dir) / "cache" / "features"),
        precision=cfg.precision,
        out_dir=cfg.out_dir,
        encoder=encoder,
        loader_workers=cfg.loader_workers,
    )

    ds = dataset if dataset is not None else load_dataset(cfg.data, **cfg.data_options)
    split = apply_shift(ds, cfg.shift, seed=cfg.seed, **cfg.shift_options)
    task = task_for(ds)
    task.check(method, ds)
    check_subgroup_keys(cfg.evaluation.subgroup_keys, ds.metadata, ds.name)
    timings["data_s"] = time.perf_counter() - t0

    with ctx.autocast():  # fit, test-time adaptation and prediction at the run's precision
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
        outcome=outcome,
        evaluations=evals,
        timings=timings,
        compute=describe_compute(requested, device, cfg.precision)
        | ({"distributed": world.describe()} if world.active else {}),
        command=invocation(),
    ).to_dict()
    if write and world.main:  # under torchrun only process 0 writes
        write_run_tables(cfg.out_dir, record)
        task.write(cfg.out_dir, record, outcome)
        if cfg.tensorboard:
            write_tensorboard(Path(cfg.out_dir) / "tensorboard" / record["run_id"], record)
    return record


def check_data_parallel(cfg: RunConfig, method: Method) -> None:
    """ConfigError unless the run trains with a method that splits its batches between the
    processes torchrun started (the others would each repeat the whole run)."""
    if isinstance(method, FitMethod):
        trainer = cfg.method
    elif cfg.source.from_ is None:
        trainer = source_method_for(method, cfg.source.method)
    else:
        trainer = None
    fit = METHODS.get(trainer)() if trainer else None
    if not isinstance(fit, FitMethod) or not fit.data_parallel or fit.task != "classification":
        able = sorted(n for n, m in METHODS.load_all().items() if getattr(m, "data_parallel", 0))
        raise ConfigError(
            f"several processes (torchrun) train with {', '.join(able)}; run {cfg.method!r} "
            f"(trained by {trainer or 'nothing'}) as one process"
        )


__all__ = ["build_classifier", "fit_source", "run_experiment", "summarise", "versions"]
