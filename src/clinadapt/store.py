"""Result records on disk: one JSON per run, written atomically, with an optional predictions file."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import DataError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    Readers see either the old file or the whole new one; a failure leaves no temporary file.
    Each call gets its own temporary name, so parallel writers of one path do not collide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        yield Path(tmp)
        # mkstemp makes 0600, and writers that replace the file themselves (safetensors) leave
        # 0600 too: give what open() would, so shared caches and weights are readable
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Atomically write one run's JSON record."""
    text = json.dumps(_clean(record), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_bytes(path, text.encode())
    return Path(path)


def read_record(path: str | Path) -> dict[str, Any]:
    """Read one JSON record; an unreadable file is a DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read result record {str(path)!r}: {e}") from e


def write_arrays(path: str | Path, **arrays: np.ndarray) -> Path:
    """Atomically write arrays (e.g. predictions) as a compressed .npz."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_run(
    out_dir: str | Path,
    record: dict[str, Any],
    probs: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    metadata: dict[str, dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write a run's predictions (with per-image ``metadata`` such as patient ids, when given),
    then its record (so a record always has its predictions)."""
    out = Path(out_dir)
    run_id = record["run_id"]
    meta = {
        f"meta/{name}/{key}": np.asarray(values).astype(str)
        for name, columns in (metadata or {}).items()
        for key, values in columns.items()
    }
    write_arrays(
        out / "predictions" / f"{run_id}.npz",
        **{f"probs/{k}": v for k, v in probs.items()},
        **{f"labels/{k}": v for k, v in labels.items()},
        **meta,
    )
    return write_record(out / f"{run_id}.json", record)


def list_records(runs_dir: str | Path) -> list[Path]:
    """Every result record in a directory (not the caches), sorted by name."""
    return sorted(p for p in Path(runs_dir).glob("*.json") if not p.name.startswith("."))
