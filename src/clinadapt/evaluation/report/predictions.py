"""Stored predictions of the runs, read once per report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SetPredictions:
    """One test set of one run: labels and probabilities (classification) or the per-image
    score table (segmentation: ``tables[field]``, see ``seg_metrics.table_from_arrays``), and
    per-image metadata (stream order)."""

    labels: np.ndarray
    probs: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.tables:
            return len(next(iter(self.tables.values())))
        return len(self.labels)

    @property
    def patients(self) -> np.ndarray | None:
        return self.meta.get("patient_id")


def read_predictions(path: Path) -> dict[str, SetPredictions]:
    """Test set -> predictions from one ``predictions/<run_id>.npz``."""
    with np.load(path) as z:
        files = set(z.files)
        out = {}

        def under(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: z[k] for k in files if k.startswith(prefix)}

        for key in sorted(files):
            if key.startswith("probs/"):
                name = key.split("/", 1)[1]
                if f"labels/{name}" in files:
                    out[name] = SetPredictions(z[f"labels/{name}"], z[key], under(f"meta/{name}/"))
            elif key.startswith("table/") and key.endswith("/dice"):  # a segmentation set
                name = key[len("table/") : -len("/dice")]
                out[name] = SetPredictions(
                    np.zeros(0), np.zeros((0, 0)), under(f"meta/{name}/"), under(f"table/{name}/")
                )
        return out


class PredictionStore:
    """Predictions by run id, each file read at most once and kept for the whole report
    (``runs_dir=None``: no predictions)."""

    def __init__(self, runs_dir: str | Path | None) -> None:
        self.dir = Path(runs_dir) / "predictions" if runs_dir is not None else None
        self._cache: dict[str, dict[str, SetPredictions]] = {}
        self.reads = 0

    def run(self, record: dict[str, Any]) -> dict[str, SetPredictions]:
        """Every test set of ``record`` (empty when its predictions were not kept)."""
        run_id = record["run_id"]
        if run_id not in self._cache:
            if self.dir is None:
                return {}
            path = self.dir / f"{run_id}.npz"
            self._cache[run_id] = read_predictions(path) if path.exists() else {}
            self.reads += path.exists()
        return self._cache[run_id]

    def get(self, record: dict[str, Any], test_set: str) -> SetPredictions | None:
        return self.run(record).get(test_set)
