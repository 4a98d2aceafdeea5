"""TensorBoard event files of a run (optional extra: ``pip install -e ".[tensorboard]"``).

Written when the run's record is written, from the record itself: the training history per
epoch (``fit/`` or ``source/``), the test-time adaptation trace per batch (``tta/<set>/``), each
test set's metrics (``test/<set>/``) and the run's settings as hyper-parameters, so runs compare
side by side in TensorBoard's scalar and HParams views.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from clinadapt.errors import ConfigError
from clinadapt.evaluation.tidy import history_rows, trace_rows

INSTALL_HINT = 'pip install -e ".[tensorboard]"'


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _hparams(record: dict[str, Any]) -> dict[str, Any]:
    cfg = record["config"]
    out: dict[str, Any] = {
        k: cfg.get(k) for k in ("model", "method", "target", "shift", "data", "seed", "batch_size")
    }
    out["target"] = out["target"] or (record.get("target") or {}).get("spec", "default")
    for k, v in (cfg.get("method_options") or {}).items():
        if isinstance(v, (int, float, str, bool)):
            out[f"method_options.{k}"] = v
    return {k: v for k, v in out.items() if v is not None}


def write_tensorboard(log_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record``'s history, trace and metrics as TensorBoard events under ``log_dir``."""
    if not tensorboard_available():
        raise ConfigError(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}")
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for row in history_rows(record):
            step = int(row.get("epoch", 0))
            for k, v in row.items():
                if k not in ("stage", "epoch") and (x := _number(v)) is not None:
                    writer.add_scalar(f"{row['stage']}/{k}", x, step)
        steps: dict[str, int] = {}
        for row in trace_rows(record):
            name = row["test_set"]
            step = steps[name] = steps.get(name, -1) + 1
            for k, v in row.items():
                if k != "test_set" and (x := _number(v)) is not None:
                    writer.add_scalar(f"tta/{name}/{k}", x, step)
        final: dict[str, float] = {}
        for name, metrics in (record.get("metrics") or {}).items():
            for k, v in metrics.items():
                if (x := _number(v)) is not None:
                    writer.add_scalar(f"test/{name}/{k}", x, 0)
        for m, summ in (record.get("summary") or {}).items():
            for part in ("in_domain", "shifted", "worst"):
                if (x := _number((summ or {}).get(part))) is not None:
                    final[f"summary/{m}/{part}"] = x
        writer.add_hparams(_hparams(record), final, run_name=".")
    finally:
        writer.close()
    return log_dir
