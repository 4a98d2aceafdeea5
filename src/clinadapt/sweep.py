"""Sweeps: the product of lists of run settings, run once each, resumable, in parallel or on Ray.

A sweep file holds a ``base`` run configuration and a ``grid`` of lists::

    out_dir: runs/sites
    base: {data_options: {patients_per_site: 60}}
    grid:
      models: [tiny-resnet, tiny-vit]
      methods: [{method: finetune, method_options: {epochs: 5}}, {method: bn}]
      shifts: [domain, {shift: corruption, shift_options: {severities: [1, 3, 5]}}]
      seeds: [0, 1, 2]
      method_options.lr: [0.001, 0.003]   # any dotted field

``models``, ``targets``, ``methods``, ``shifts``, ``datasets`` and ``seeds`` name the fields
``model``, ``target``, ``method``, ``shift``, ``data`` and ``seed``; an entry of those lists may
also be a mapping of several fields that go together. A run whose record exists is skipped, so an
interrupted sweep resumes where it stopped (records are written atomically: a killed run reruns).
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinadapt.config import RunConfig, apply_settings, read_yaml_mapping, run_config, set_dotted
from clinadapt.distributed import decide, launched, world
from clinadapt.distributed import init as join_processes
from clinadapt.errors import ConfigError
from clinadapt.preflight import check_run
from clinadapt.progress import bar, is_quiet, set_quiet, status
from clinadapt.record import existing_record
from clinadapt.store import write_record

AXIS_ALIASES = {
    "models": "model",
    "targets": "target",
    "methods": "method",
    "shifts": "shift",
    "datasets": "data",
    "seeds": "seed",
}


@dataclass
class Sweep:
    """A base configuration and the lists whose product gives the runs."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    out_dir: str
    settings: list[str] = field(default_factory=list)  # --set KEY=VALUE, applied to every run

    def configs(self) -> list[RunConfig]:
        """Every run of the sweep, in grid order, without duplicates."""
        axes = [(AXIS_ALIASES.get(k, k), k, v) for k, v in self.grid.items()]
        out, seen = [], set()
        for combo in itertools.product(*[values for _, _, values in axes]):
            data = copy.deepcopy(self.base)
            for (fname, axis, _), value in zip(axes, combo, strict=True):
                if isinstance(value, dict) and axis in AXIS_ALIASES:
                    for k, v in value.items():
                        set_dotted(data, k, copy.deepcopy(v))
                else:
                    set_dotted(data, fname, copy.deepcopy(value))
            apply_settings(data, self.settings)
            data["out_dir"] = self.out_dir
            cfg = run_config(data, f"sweep run {dict(zip(self.grid, combo, strict=True))}")
            if cfg.run_id() not in seen:
                seen.add(cfg.run_id())
                out.append(cfg)
        return out


def load_sweep(
    path: str | Path, out_dir: str | None = None, settings: list[str] | None = None
) -> Sweep:
    """Read a sweep YAML file; ``settings`` (``--set``) apply to every run after the grid."""
    p = Path(path)
    data = read_yaml_mapping(p, "sweep", "with 'base' and 'grid'")
    unknown = set(data) - {"base", "grid", "out_dir"}
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)}; expected base, grid, out_dir")
    base = data.get("base") or {}
    grid = data.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise ConfigError(f"{p}: 'base' and 'grid' must be mappings")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid.{key} must be a non-empty list, got {values!r}")
    out = out_dir or data.get("out_dir") or base.get("out_dir") or "clinadapt-runs"
    return Sweep(base=base, grid=grid, out_dir=str(out), settings=list(settings or []))


def record_path(cfg: RunConfig) -> Path:
    """Where the record of ``cfg`` is written."""
    return Path(cfg.out_dir) / f"{cfg.run_id()}.json"


def is_done(cfg: RunConfig) -> bool:
    """Whether ``cfg`` already has a complete record of its own (a stub, a truncated file or
    another run's record under its name does not count)."""
    return existing_record(cfg.out_dir, cfg.run_id(), cfg.weights) is not None


@dataclass
class SweepResult:
    """What a sweep did: runs skipped (already done), run now, and failed (with their errors)."""

    total: int
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Counts (and the failures) for JSON output."""
        return {
            "total": self.total,
            "skipped": len(self.skipped),
            "ran": len(self.ran),
            "failed": self.failed,
        }


def run_one(config: dict[str, Any]) -> tuple[str, str | None]:
    """Run one configuration (in this process); return its run id and an error, if any.

    A failure is written to ``failed/<run_id>.json`` beside the records and never counts as
    done, so the next sweep retries it.
    """
    from clinadapt.runner import run_experiment

    cfg = RunConfig(**config)
    run_id = cfg.run_id()
    failure = Path(cfg.out_dir) / "failed" / f"{run_id}.json"
    try:
        run_experiment(cfg)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        if world().main:  # under torchrun only process 0 writes
            write_record(
                failure,
                {
                    "run_id": run_id,
                    "config": config,
                    "error": msg,
                    "traceback": traceback.format_exc(),
                },
            )
        return run_id, msg
    if world().main:
        failure.unlink(missing_ok=True)
    return run_id, None


def join_sweep(configs: list[RunConfig]) -> None:
    """Under torchrun, join the process group before the sweep decides what is done (on a
    GPU when any run uses one); nothing otherwise."""
    if not launched() or not configs:
        return
    from clinadapt.compute import resolve_device

    devices = {resolve_device(cfg.device) for cfg in configs}
    join_processes("cuda" if any(d.startswith("cuda") for d in devices) else "cpu")


def _init_worker(threads: int) -> None:
    set_quiet(True)  # the parent shows one bar for the whole sweep
    import torch

    torch.set_num_threads(threads)


def run_sweep(
    sweep: Sweep | list[RunConfig],
    workers: int = 1,
    use_ray: bool = False,
    *,
    ray_address: str | None = None,
    ray_cpus: float = 1.0,
    ray_gpus: float | None = None,
) -> SweepResult:
    """Run every configuration that has no record yet; in ``workers`` processes or as Ray tasks.

    With ``use_ray`` (implied by ``ray_address``) each run is one Ray task with ``ray_cpus``
    CPUs and ``ray_gpus`` GPUs (default: one when the runs use a GPU and the cluster has one);
    see :mod:`clinadapt.ray_tasks` for how the cluster is found. A task that dies counts as a
    failed run, which the next sweep retries.
    """
    configs = sweep.configs() if isinstance(sweep, Sweep) else list(sweep)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if use_ray or ray_address:
        from clinadapt.ray_tasks import check_resources

        check_resources(ray_cpus, ray_gpus)
    for cfg in configs:  # every run's options before the first run starts
        check_run(cfg)
    result = SweepResult(total=len(configs))
    join_sweep(configs)
    todo = []
    for cfg in configs:
        if decide(is_done(cfg)):  # under torchrun: rank 0 (which writes records) decides
            result.skipped.append(cfg.run_id())
        else:
            todo.append(cfg)
    if result.skipped:
        status(
            f"sweep: {len(result.skipped)} of {len(configs)} runs already have records; skipping"
        )
    progress = bar(len(configs), "sweep", initial=len(result.skipped))
    try:

        def done(run_id: str, error: str | None) -> None:
            if error is None:
                result.ran.append(run_id)
            else:
                result.failed[run_id] = error
                status(f"sweep: {run_id} failed: {error}")
            progress.update(1)
            progress.set_postfix(failed=len(result.failed))

        if use_ray or ray_address:
            _run_ray(todo, done, ray_address, ray_cpus, ray_gpus)
        elif workers == 1:
            for cfg in todo:
                done(*run_one(cfg.model_dump()))
        else:
            _run_processes(todo, workers, done)
    finally:
        progress.close()
    return result


def _run_processes(todo: list[RunConfig], workers: int, done) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # no forked torch state in the workers
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        pending = {pool.submit(run_one, cfg.model_dump()) for cfg in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(*f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _run_ray(
    todo: list[RunConfig], done, address: str | None, cpus: float, gpus: float | None
) -> None:
    from clinadapt.ray_tasks import ray_session, run_tasks, task_gpus

    if not todo:
        return
    with ray_session(address, quiet=is_quiet()) as ray:
        # one GPU per run when the runs use one (all of a sweep's runs share its device)
        devices = {cfg.device for cfg in todo}
        per_run = max(task_gpus(ray, d, gpus) for d in devices)

        def finished(i: int, result: tuple[str, str | None] | None, error: BaseException | None):
            if error is not None:  # the task itself died (worker killed, out of memory, ...)
                done(todo[i].run_id(), f"Ray task failed: {type(error).__name__}: {error}")
            else:
                done(*result)

        run_tasks(
            _ray_run,
            [(cfg.model_dump(),) for cfg in todo],
            finished,
            cpus=cpus,
            gpus=per_run,
        )


def _ray_run(_shared: None, config: dict[str, Any]) -> tuple[str, str | None]:
    return run_one(config)


def describe(sweep: Sweep) -> list[dict[str, Any]]:
    """One line per run: its id and whether its record exists (for --dry-run)."""
    return [{"run_id": c.run_id(), "done": is_done(c)} for c in sweep.configs()]


__all__ = ["Sweep", "SweepResult", "describe", "load_sweep", "run_one", "run_sweep"]
