"""Checks a run passes before any work starts: options, device, output folder.

A mistyped data option, an infinite learning rate, ``--device cuda`` on a machine without a GPU
or an ``--out`` that is a file used to fail after the data was generated and a model trained;
each is now a one-line error before the first image is read.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import tempfile
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, ValidationError, create_model

from clinadapt.errors import ConfigError, brief

if TYPE_CHECKING:
    from clinadapt.config import RunConfig


def check_call_options(
    fn: Callable[..., Any], options: Mapping[str, Any], what: str, skip: tuple[str, ...] = ()
) -> None:
    """Fail unless ``fn`` takes every key of ``options`` with a value of its annotated type.

    ``skip``: parameters the caller passes itself (a shift's dataset and seed).
    """
    sig = inspect.signature(fn)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip
    }
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in options if k not in params and k not in skip]
    if unknown and not takes_any:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(params), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{what}: unknown option {k!r}{hint} (options: {', '.join(params) or 'none'})"
        )
    target = fn.func if isinstance(fn, functools.partial) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # annotations that cannot be resolved here: the call will judge
        return
    fields = {k: (hints.get(k, Any), ...) for k in options if k in params}
    config = ConfigDict(arbitrary_types_allowed=True, allow_inf_nan=False)
    try:
        model = create_model("Options", __config__=config, **fields)
    except Exception:  # a type pydantic cannot check (e.g. a protocol): the call will judge
        return
    try:
        model(**{k: v for k, v in options.items() if k in fields})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(
            f"{what}: option {where!r}: {err['msg']} (got {brief(err.get('input'))})"
        ) from e


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """Create ``path`` if needed and make sure files can be written there; return it."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a file, not a folder; choose a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"{what} {str(p)!r} is not writable ({e.strerror or type(e).__name__})"
        ) from e
    return p


def check_data_options(data: str, options: Mapping[str, Any]) -> None:
    """Fail on an option the dataset's reader does not take, or a value of the wrong type."""
    from clinadapt.data import dataset_reader

    reader = dataset_reader(data)
    if reader is not None:
        check_call_options(reader, options, f"data_options of {data!r}")


def check_run(cfg: RunConfig, data: bool = True) -> None:
    """Everything about ``cfg`` that can be checked without data or a model.

    ``data=False``: the run is given a dataset object, so ``cfg.data`` names no reader.
    """
    from clinadapt.compute import check_precision, resolve_device
    from clinadapt.methods import METHODS, TTAMethod
    from clinadapt.methods.tta.protocol import source_method_for
    from clinadapt.shifts import SHIFTS
    from clinadapt.targets import check_target

    check_precision(cfg.precision, resolve_device(cfg.device))
    method = METHODS.get(cfg.method)()
    method.parse_options(cfg.method_options)
    target = cfg.target or method.default_target
    if target != "none":
        check_target(target, cfg.target_options)
    if isinstance(method, TTAMethod):  # the source's method and options too
        METHODS.get(source_method_for(method, cfg.source.method))().parse_options(
            cfg.source.options
        )
    if cfg.stream_executor == "ray":
        if not isinstance(method, TTAMethod) or method.task != "classification":
            raise ConfigError(
                f"stream_executor=ray runs the test streams of classification test-time "
                f"methods; {cfg.method!r} is not one (leave stream_executor local)"
            )
        from clinadapt.ray_tasks import import_ray

        import_ray("stream_executor=ray")
    if data:
        check_data_options(cfg.data, cfg.data_options)
    check_call_options(
        SHIFTS.get(cfg.shift), cfg.shift_options, f"shift {cfg.shift!r}", skip=("ds", "seed")
    )
    check_out_dir(cfg.out_dir)


def check_subgroup_keys(keys: list[str], metadata: Mapping[str, Any], data_name: str) -> None:
    """A subgroup key the user asked for that no metadata column of the dataset holds would be
    left out of every record without a word: ConfigError naming it and the columns there are.
    The default list (:data:`clinadapt.evaluation.subgroups.SUBGROUP_KEYS`) may name keys a
    dataset lacks; a list the user chose (any other) may not, default keys in it included."""
    from clinadapt.evaluation.subgroups import SUBGROUP_KEYS

    if tuple(keys) == SUBGROUP_KEYS:
        return
    missing = [k for k in keys if k not in metadata]
    if not missing:
        return
    columns = sorted(metadata)
    close = difflib.get_close_matches(missing[0], columns, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"evaluation.subgroup_keys: {brief(missing)} in no metadata column of {data_name}{hint} "
        f"(its columns: {', '.join(columns) or 'none'})"
    )
