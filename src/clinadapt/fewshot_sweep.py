"""A few-shot sweep: methods x shot counts x seeds on frozen features from one embedding pass.

The whole dataset is embedded once (through the feature cache); every split, support set and
test set is a selection of those rows. Each (method, shots, seed) writes the runner's result
record, so the report reads sweep runs like any other; existing records are skipped, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.compute import autocast, check_precision, resolve_device
from clinadapt.compute import describe as describe_compute
from clinadapt.config import RunConfig, run_config
from clinadapt.data import load_dataset
from clinadapt.data.base import ClinicalDataset
from clinadapt.distributed import one_process_only
from clinadapt.errors import ConfigError, brief
from clinadapt.features import FeatureCache, resolve_cache_dir, rows_in
from clinadapt.methods import METHODS, Context
from clinadapt.methods.base import logits_to_proba
from clinadapt.methods.frozen import FrozenFeatureMethod, LabelledFeatures, head_logits
from clinadapt.preflight import check_data_options, check_out_dir, check_subgroup_keys
from clinadapt.progress import bar, status
from clinadapt.record import (
    build_record,
    check_metric,
    existing_record,
    versions,
)
from clinadapt.runner import build_classifier, invocation, target_record, write_run_tables
from clinadapt.shifts import ShiftSplit, apply_shift
from clinadapt.targets import apply_target
from clinadapt.tasks.base import Outcome, task_for

DEFAULT_METHODS = ("prototype", "knn", "tip-adapter", "linear-probe")
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
VIEWS = ("in_domain", "shifted", "worst")


@dataclass
class SweepResult:
    """The records of a sweep (written or reused) and what the backbone cost."""

    records: list[dict[str, Any]]
    cache: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: int = 0


def frozen_method(name: str) -> FrozenFeatureMethod:
    """The registered method ``name``, which must fit a head on frozen features."""
    method = METHODS.get(name)()
    if not isinstance(method, FrozenFeatureMethod):
        frozen = sorted(e.name for e in METHODS.entries() if issubclass(e.obj, FrozenFeatureMethod))
        raise ConfigError(
            f"method {name!r} does not work on frozen features, so a few-shot sweep cannot reuse "
            f"one embedding pass for it; sweepable: {frozen}. Run it with `clinadapt run "
            f"--method {name} -o method_options.shots=K`."
        )
    return method


def run_configs(
    base: RunConfig,
    methods: list[str],
    shots: list[int],
    seeds: list[int],
    method_options: dict[str, dict[str, Any]] | None = None,
) -> list[RunConfig]:
    """One run configuration per (method, shots, seed), as ``clinadapt run`` would take it."""
    if not methods or not shots or not seeds:
        raise ConfigError("a few-shot sweep needs at least one method, shot count and seed")
    if base.adaptive_temperature:
        raise ConfigError(
            "a few-shot sweep evaluates heads on cached features, so adaptive temperature in the "
            "backbone's attention cannot apply; run it with `clinadapt run`"
        )
    if base.method_options:
        raise ConfigError(
            "a sweep takes options per method (--set method_options.knn.k=10), not method_options "
            f"{brief(base.method_options)}"
        )
    method_options = method_options or {}
    unknown = sorted(set(method_options) - set(methods))
    if unknown:
        raise ConfigError(f"options given for method(s) {unknown} not in the sweep {methods}")
    out = []
    for name in methods:
        method = frozen_method(name)
        for k in shots:
            opts = {**method_options.get(name, {}), "shots": int(k)}
            method.parse_options(opts)  # fail before any work on a bad option
            for s in seeds:
                data = {**base.model_dump(), "method": name, "method_options": opts, "seed": s}
                out.append(run_config(data, f"few-shot run ({name}, {k} shots, seed {s})"))
    return out


class _Embedded:
    """The dataset, its splits, the backbone and every image's features, each made on first use."""

    def __init__(self, base: RunConfig, cache: FeatureCache) -> None:
        self.base = base
        self.cache = cache
        self._splits: dict[int, ShiftSplit] = {}
        self._ds: ClinicalDataset | None = None
        self._features: np.ndarray | None = None
        self.timings: dict[str, float] = {}
        self.versions = versions()

    @property
    def ds(self) -> ClinicalDataset:
        if self._ds is None:
            t = time.perf_counter()
            ds = load_dataset(self.base.data, **self.base.data_options)
            check_subgroup_keys(self.base.evaluation.subgroup_keys, ds.metadata, ds.name)
            self._ds = ds
            self.timings["load_s"] = time.perf_counter() - t
        return self._ds

    @property
    def features(self) -> np.ndarray:
        if self._features is None:
            base = self.base
            t = time.perf_counter()
            # the backbone is built once, from the base seed; seeds vary the support sets
            self.model = build_classifier(base, self.ds.num_classes)
            self.info = apply_target(self.model, "head")
            self.timings["load_s"] += time.perf_counter() - t
            t = time.perf_counter()
            self._features = self.cache.features(self.model, self.ds, base.batch_size, base.device)
            self.timings["embed_s"] = time.perf_counter() - t
        return self._features

    def split(self, seed: int) -> ShiftSplit:
        if seed not in self._splits:
            self._splits[seed] = apply_shift(
                self.ds, self.base.shift, seed=seed, **self.base.shift_options
            )
        return self._splits[seed]

    def of(self, part: ClinicalDataset) -> np.ndarray:
        return self.features[rows_in(self.ds, part)]


def run_fewshot_sweep(
    base: RunConfig,
    methods: list[str] | tuple[str, ...] = DEFAULT_METHODS,
    shots: list[int] | tuple[int, ...] = DEFAULT_SHOTS,
    seeds: list[int] | tuple[int, ...] = tuple(range(5)),
    method_options: dict[str, dict[str, Any]] | None = None,
    *,
    skip_existing: bool = True,
) -> SweepResult:
    """Run every (method, shots, seed) of a few-shot sweep; write one record per run.

    ``base`` gives model, data, shift, batch size, device and ``out_dir``; its ``seed`` builds
    the backbone (which matters only for randomly initialised models).
    """
    one_process_only("clinadapt fewshot", "its heads train on features embedded once")
    t0 = time.perf_counter()
    requested = base.device
    device = resolve_device(requested)
    check_precision(base.precision, device)
    base = base.model_copy(update={"device": device})
    compute = describe_compute(requested, device, base.precision)
    check_out_dir(base.out_dir)  # before the dataset is read and embedded
    check_data_options(base.data, base.data_options)
    configs = run_configs(base, list(methods), list(shots), list(seeds), method_options)
    out = Path(base.out_dir)
    cache = FeatureCache(resolve_cache_dir(out / "cache" / "features"))
    emb = _Embedded(base, cache)
    done = (
        {c.run_id(): existing_record(out, c.run_id(), c.weights) for c in configs}
        if skip_existing
        else {}
    )
    todo = [c for c in configs if done.get(c.run_id()) is None]
    for cfg in todo:
        # every support set is drawn before the backbone runs: too few images fails at once
        method = frozen_method(cfg.method)
        task_for(emb.ds).check(method, emb.ds)  # a classification sweep: no segmentation data
        split = emb.split(cfg.seed)
        split.train.require_classes()
        method.labelled_budget(
            split.train, split.val, method.parse_options(cfg.method_options), cfg.seed
        )
    todo_ids = {c.run_id() for c in todo}
    records = []
    pbar = bar(len(configs), "few-shot sweep")
    try:
        for cfg in configs:
            if cfg.run_id() in todo_ids:
                with autocast(device, base.precision):  # the embedding pass runs in here
                    records.append(_run_one(cfg, emb, compute))
            else:
                records.append(done[cfg.run_id()])
            pbar.update(1)
    finally:
        pbar.close()
    skipped = len(configs) - len(todo)
    total = time.perf_counter() - t0
    timings = {**emb.timings, "total_s": total}
    if "embed_s" in emb.timings:  # heads, metrics and records: all after the embedding pass
        timings["runs_s"] = total - emb.timings["load_s"] - emb.timings["embed_s"]
    status(
        f"few-shot sweep: {len(records)} runs ({skipped} reused), "
        f"{cache.embedded} images embedded ({cache.misses} pass(es), {cache.hits} cache hit(s))"
    )
    return SweepResult(records, cache.stats(), timings, skipped)


def _run_one(cfg: RunConfig, emb: _Embedded, compute: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    method = frozen_method(cfg.method)
    opts = method.parse_options(cfg.method_options)
    split = emb.split(cfg.seed)
    ds = emb.ds
    ctx = Context(
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        cache_dir=str(Path(cfg.out_dir) / "cache" / "features"),
    )
    # only the labelled images the budget allows: K per class (and a K-shot validation set
    # when selection is kshot-val), exactly as `clinadapt run` gives the method
    budget = method.labelled_budget(split.train, split.val, opts, cfg.seed)
    support = LabelledFeatures(emb.of(budget.train), budget.train.labels)
    val = None
    if budget.val is not None:
        val = LabelledFeatures(emb.of(budget.val), budget.val.labels)
    resolved = opts.model_copy(update={"selection": budget.selection})
    head, summary = method.fit_head(emb.model, support, val, budget.train, resolved, ctx)
    head = head.to(cfg.device)
    fit_s = time.perf_counter() - t0
    t = time.perf_counter()
    probs, labels, meta = {}, {}, {}
    for name, test in split.tests.items():
        probs[name] = _proba(head, emb.of(test), ds.task, cfg.device)
        labels[name] = test.labels
        meta[name] = test.metadata
    val_pred = None
    if val is not None and ds.task == "binary":  # the budget's validation images only
        val_pred = (val.y, _proba(head, val.x, ds.task, cfg.device))
    outcome = Outcome(
        model=emb.model.encoder.describe(),
        target=target_record(emb.info, method),
        method={"name": cfg.method, "kind": method.kind, "options": opts.model_dump()},
        predictions={"probs": probs, "labels": labels, "meta": meta, "val": val_pred},
        parts={
            "training": {
                **summary,
                "selection": budget.selection,
                "support_images": len(support.y),
            },
            "labelled": budget.describe(),
            "fewshot": {
                "shots": opts.shots,
                "support_seed": cfg.seed,
                "backbone_seed": emb.base.seed,
                "support_images": len(support.y),
                "features": "one embedding pass of the whole dataset, shared by the sweep",
            },
        },
    )
    task = task_for(ds)
    evals = task.evaluate(outcome, split, cfg)  # what `clinadapt run` measures, as it does
    evaluate_s = time.perf_counter() - t
    record = build_record(
        cfg,
        task=task,
        data=ds,
        split=split,
        outcome=outcome,
        evaluations=evals,
        timings={"fit_s": fit_s, "evaluate_s": evaluate_s},
        run_versions=emb.versions,
        compute=compute,
        command=invocation(),
    ).to_dict()
    write_run_tables(cfg.out_dir, record)
    task.write(cfg.out_dir, record, outcome)
    return record


def _proba(head: Any, features: np.ndarray, task: str, device: str) -> np.ndarray:
    return logits_to_proba(head_logits(head, features, device), task).numpy().astype(np.float64)


def record_value(record: dict[str, Any], metric: str, view: str) -> float | None:
    """One number of a record: a summary view (in_domain, shifted, worst) or a test set's value."""
    if view in VIEWS:
        entry = record.get("summary", {}).get(metric)
        if entry is None:
            return None
        value = entry.get(view)
        if value is None and view == "shifted":  # no shifted test set: fall back to in-domain
            value = entry.get("in_domain")
        return value
    value = record.get("metrics", {}).get(view, {}).get(metric)
    return None if value is None else float(value)


def unknown_view(view: str, sets: Any) -> ConfigError:
    return ConfigError(
        f"unknown view {view!r}; choose {', '.join(VIEWS)} or a test set: {', '.join(sorted(sets))}"
    )


def check_view(base: RunConfig, view: str, seed: int = 0) -> None:
    """ConfigError before any work for a table ``view`` that is neither a summary view nor a
    test set of ``base``'s shift (seen first in the table, it failed after the whole sweep)."""
    if view in VIEWS:
        return
    check_data_options(base.data, base.data_options)
    ds = load_dataset(base.data, **base.data_options)
    tests = apply_shift(ds, base.shift, seed=seed, **base.shift_options).tests
    if view not in tests:
        raise unknown_view(view, tests)


def sweep_table(
    records: list[dict[str, Any]], metric: str = "balanced_accuracy", view: str = "shifted"
) -> tuple[list[str], list[list[str]]]:
    """Rows per shot count, a column per method: mean ± sample SD of ``metric`` over seeds."""
    if records:
        check_metric(records, metric)
        sets = {name for r in records for name in r.get("metrics", {})}
        if view not in VIEWS and view not in sets:
            raise unknown_view(view, sets)
    cells: dict[tuple[str, int], list[float]] = {}
    methods: list[str] = []
    for r in records:
        name, shots = r["method"]["name"], r["method"]["options"].get("shots")
        value = record_value(r, metric, view)
        if shots is None or value is None:
            continue
        if name not in methods:
            methods.append(name)
        cells.setdefault((name, int(shots)), []).append(float(value))
    shot_counts = sorted({k for _, k in cells})
    n_max = max((len(v) for v in cells.values()), default=0)
    header = ["shots", *methods]
    rows = []
    for k in shot_counts:
        row = [str(k)]
        for m in methods:
            vals = cells.get((m, k))
            row.append(_mean_sd(vals, n_max) if vals else "-")
        rows.append(row)
    return header, rows


def _mean_sd(values: list[float], n_expected: int) -> str:
    """``mean ± SD`` (sample SD, ddof=1); the count is shown when it differs from the rest."""
    text = f"{float(np.mean(values)):.3f}"
    if len(values) > 1:
        text += f" ± {float(np.std(values, ddof=1)):.3f}"
    return text if len(values) == n_expected else f"{text} (n={len(values)})"


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; errors name the option."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from e
    if not values:
        raise ConfigError(f"{what}: no value in {text!r}")
    return values


def parse_seeds(text: str) -> list[int]:
    """``"5"`` -> seeds 0..4; ``"0,3,7"`` -> those seeds."""
    values = parse_int_list(text, "--seeds")
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise ConfigError(f"--seeds: a count must be at least 1, got {values[0]}")
        return list(range(values[0]))
    return values
