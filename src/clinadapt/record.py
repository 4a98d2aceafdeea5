"""The result record of one run: one typed builder for every kind of run, one reader.

``clinadapt run`` (fit and test-time methods), the few-shot sweep and any later task build their
record with :func:`build_record` from the same parts (config, data, split, model, target,
method, the evaluation of every test set), so every record holds the same evaluation: headline
metrics, subgroups, bootstrap CIs, selective prediction and the binary operating point, with
the run's ``evaluation`` settings. :func:`load_record` and :func:`read_records` are the one way
to read records back: a truncated or foreign JSON file is a :class:`DataError` naming it, or,
in a folder, a skipped file with a warning.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinadapt.errors import ConfigError, DataError
from clinadapt.models._weights import weights_fingerprint
from clinadapt.store import list_records, read_record

if TYPE_CHECKING:
    from clinadapt.config import RunConfig
    from clinadapt.data.base import ClinicalDataset
    from clinadapt.shifts import ShiftSplit
    from clinadapt.tasks.base import Outcome, Task

#: Version of the record layout; records of every version listed in READABLE load.
SCHEMA = 2
READABLE = (1, 2)
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


class RunRecord(BaseModel):
    """What one run wrote: its identity, what it ran on, what it changed and what it measured.

    ``metrics[set]`` holds the headline metrics of each test set (null where undefined); the
    task's evaluation parts (classification: ``subgroups``, ``ci``, ``selective``,
    ``operating_point``) are keyed by test set like it. Parts beyond these (``training``,
    ``tta``, ``source``, ``fewshot``, ...) are kept as they are.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    schema_version: int = Field(SCHEMA, alias="schema")
    run_id: str
    created: str
    config: dict[str, Any]
    seed: int
    versions: dict[str, str]
    task: str = "classification"
    data: dict[str, Any]
    shift: dict[str, Any]
    model: dict[str, Any]
    target: dict[str, Any]
    method: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    adaptive_temperature: dict[str, Any] | None = None
    timings: dict[str, float | None] = Field(default_factory=dict)
    status: str = "ok"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping written to ``<run_id>.json``."""
        return self.model_dump(by_alias=True)


def versions() -> dict[str, str]:
    """The Python and package versions a record was made with."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def summarise(
    metrics: Mapping[str, Mapping[str, Any]],
    in_domain: list[str],
    names: tuple[str, ...] | list[str] = SUMMARY_METRICS,
) -> dict[str, Any]:
    """In-domain and shifted means, and the worst test set, for the headline metrics ``names``."""
    from clinadapt.evaluation.subgroups import lower_is_better

    out: dict[str, Any] = {}
    shifted = [k for k in metrics if k not in in_domain]
    for m in names:
        vals = {k: v[m] for k, v in metrics.items() if v.get(m) is not None and v[m] == v[m]}
        if not vals:
            continue
        worst = (max if lower_is_better(m) else min)(vals, key=vals.get)
        ind = [vals[k] for k in in_domain if k in vals]
        sh = [vals[k] for k in shifted if k in vals]
        out[m] = {
            "in_domain": float(np.mean(ind)) if ind else None,
            "shifted": float(np.mean(sh)) if sh else None,
            "worst": vals[worst],
            "worst_set": worst,
        }
    return out


def build_record(
    cfg: RunConfig,
    *,
    task: Task,
    data: ClinicalDataset,
    split: ShiftSplit,
    outcome: Outcome,
    evaluations: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, float],
    run_versions: dict[str, str] | None = None,
    **parts: Any,
) -> RunRecord:
    """The record of one run of ``cfg``: what ``task.run`` produced and ``task.evaluate`` measured.

    ``outcome`` gives the record's ``model``, ``target`` and ``method`` and the kind's own parts
    (``training``, ``tta``, ``source``, ``fewshot``, ``prompts``, ``adaptive_temperature``,
    ...); ``evaluations[set]`` holds ``metrics`` and the task's ``evaluation_parts``;
    ``parts`` are the run's own (``compute``: where and at which precision it ran).
    """
    metrics = {name: dict(e["metrics"]) for name, e in evaluations.items()}
    files = weights_fingerprint(cfg.weights)
    if files is not None:  # which local weights file it ran on (a resumed sweep compares it)
        parts = {"weights_files": files, **parts}
    fields: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": cfg.run_id(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model_dump(),
        "seed": cfg.seed,
        "versions": run_versions or versions(),
        "task": task.name,
        "data": {**data.summary(), "class_names": list(data.class_names)},
        "shift": split.describe(),
        "model": outcome.model,
        "target": outcome.target,
        "method": outcome.method,
        "metrics": metrics,
        "summary": summarise(metrics, split.in_domain, task.summary_metrics),
        "timings": dict(timings),
        **{
            part: {name: e[part] for name, e in evaluations.items() if part in e}
            for part in task.evaluation_parts
            if any(part in e for e in evaluations.values())
        },
        **outcome.parts,
        **parts,
    }
    return RunRecord.model_validate(fields)


def load_record(path: str | Path, run_id: str | None = None) -> dict[str, Any]:
    """Read and check one result record; a truncated or foreign file is a DataError naming it.

    ``run_id``: the record must be that run's (a file copied under another name is not).
    """
    path = Path(path)
    data = read_record(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a clinadapt result record (a JSON {type(data).__name__})")
    schema = data.get("schema", 1)
    if schema not in READABLE:
        raise DataError(f"{path}: record schema {schema!r}; this clinadapt reads {READABLE}")
    try:
        record = RunRecord.model_validate(data)
    except ValidationError as e:
        missing = [".".join(map(str, err["loc"])) for err in e.errors()][:5]
        raise DataError(
            f"{path}: not a complete clinadapt result record (missing or malformed: "
            f"{', '.join(missing)})"
        ) from e
    if run_id is not None and record.run_id != run_id:
        raise DataError(f"{path}: holds run {record.run_id!r}, not {run_id!r}")
    return record.to_dict()


def existing_record(
    out_dir: str | Path, run_id: str, weights: str | None = None
) -> dict[str, Any] | None:
    """The complete record of ``run_id`` in ``out_dir``, or None (absent, stub, truncated,
    another run's, or made with other weights at the local path ``weights``, e.g. a backbone a
    resumed pre-training rewrote): what a resumable sweep may skip."""
    path = Path(out_dir) / f"{run_id}.json"
    if not path.exists():
        return None
    try:
        record = load_record(path, run_id=run_id)
    except DataError:
        return None
    files = weights_fingerprint(weights)
    if files is not None and record.get("weights_files") != files:
        from clinadapt.progress import warn

        warn(f"{path}: made with other weights than those now at {weights}; running it again")
        return None
    return record


def read_records(runs_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every result record in ``runs_dir``, and the files skipped (path -> why), each warned of.

    A folder of records may hold a file being written by hand, a truncated copy or another
    tool's JSON: those are skipped with a warning naming them, never fatal and never silent.
    """
    from clinadapt.progress import warn

    records, skipped = [], {}
    for path in list_records(runs_dir):
        try:
            records.append(load_record(path))
        except DataError as e:
            skipped[str(path)] = str(e)
            warn(f"skipped {e}")
    return records, skipped


def check_metric(records: list[dict[str, Any]], metric: str) -> None:
    """Fail unless some record measured ``metric`` (a typo would give a table of "-")."""
    known = {m for r in records for v in r.get("metrics", {}).values() for m in v}
    known = sorted(known | {m for r in records for m in r.get("summary", {})})
    if metric not in known:
        raise ConfigError(f"unknown metric {metric!r}; the records hold {', '.join(known)}")


__all__ = [
    "SCHEMA",
    "RunRecord",
    "build_record",
    "check_metric",
    "existing_record",
    "load_record",
    "read_records",
    "summarise",
    "versions",
]
