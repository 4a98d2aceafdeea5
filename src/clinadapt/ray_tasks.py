"""Work as Ray tasks: the runs of a sweep, and the independent test streams of one run.

:func:`ray_session` joins a cluster: ``address`` (``ray://...`` or ``host:port``), else the
one ``$RAY_ADDRESS`` names, else a local Ray instance started on this machine (and stopped at
the end). The driver's clinadapt settings (``CLINADAPT_*``, ``HF_HUB_OFFLINE``,
``TRANSFORMERS_OFFLINE``) are set in every task, and each task works in the driver's folder
when its node has it, so relative paths in a configuration mean the same there (put
``out_dir`` and data on storage every node sees). A task gets ``cpus`` CPUs (torch uses as
many threads) and, when its work runs on a GPU, one GPU unless ``gpus`` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from clinadapt.errors import ConfigError

RAY_HINT = "pip install 'clinadapt[ray]'  (or: pip install 'ray[default]')"
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def import_ray(what: str = "--ray") -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"{what} needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def forwarded_env() -> dict[str, str]:
    """The driver's environment variables that every task gets."""
    return {k: v for k, v in os.environ.items() if k.startswith("CLINADAPT_") or k in FORWARDED_ENV}


@contextlib.contextmanager
def ray_session(
    address: str | None = None, quiet: bool = False, what: str = "--ray"
) -> Iterator[Any]:
    """Ray, initialised for the block: joined to ``address`` (else ``$RAY_ADDRESS``, else a
    local instance). A session this process already holds (e.g. inside a Ray task) is used as
    it is and left open."""
    ray = import_ray(what)
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(
            address=address,
            log_to_driver=not quiet,
            runtime_env={"env_vars": forwarded_env()},
        )
    except ConnectionError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r}: {e}") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def check_resources(cpus: float, gpus: float | None = None) -> None:
    """ConfigError unless a task's CPUs are > 0 and its GPUs (when given) >= 0."""
    if not cpus > 0:
        raise ConfigError(f"CPUs per Ray task must be > 0, got {cpus}")
    if gpus is not None and not gpus >= 0:
        raise ConfigError(f"GPUs per Ray task must be >= 0, got {gpus}")


def task_gpus(ray: Any, device: str, gpus: float | None) -> float:
    """GPUs one task asks for: ``gpus`` if given; else 1 when the work may use a GPU (device
    not ``cpu``) and the cluster has one (Ray hides the GPUs from a task that asks for none)."""
    if gpus is not None:
        check_resources(1.0, gpus)
        return gpus
    if device == "cpu":
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def run_tasks(
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    done: Callable[[int, Any, BaseException | None], None],
    *,
    cpus: float = 1.0,
    gpus: float = 0.0,
    shared: Any = None,
) -> None:
    """Run ``fn(shared, *args[i])`` as one Ray task per ``i``; call ``done(i, result, error)``
    as each finishes (``error``: the Ray failure of a task, e.g. its worker died).

    ``shared`` is put in the object store once and handed to every task. Needs a session
    (:func:`ray_session`); pending tasks are cancelled if this is interrupted.
    """
    import ray

    check_resources(cpus, gpus)
    remote = ray.remote(_in_task).options(num_cpus=cpus, num_gpus=gpus)
    shared_ref = ray.put(shared)
    cwd = os.getcwd()
    threads = max(1, int(cpus))
    index = {remote.remote(fn, cwd, threads, shared_ref, *a): i for i, a in enumerate(args)}
    pending = list(index)
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            for ref in finished:
                try:
                    result, error = ray.get(ref), None
                except ray.exceptions.RayError as e:
                    result, error = None, e
                done(index[ref], result, error)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


def _in_task(fn: Callable[..., Any], cwd: str, threads: int, shared: Any, *args: Any) -> Any:
    """Inside a task: the driver's folder (where the node has it), quiet, ``threads`` threads."""
    import torch

    from clinadapt.progress import set_quiet

    if Path(cwd).is_dir():
        os.chdir(cwd)
    set_quiet(True)
    torch.set_num_threads(threads)
    return fn(shared, *args)


__all__ = [
    "RAY_HINT",
    "check_resources",
    "forwarded_env",
    "import_ray",
    "ray_session",
    "run_tasks",
    "task_gpus",
]
