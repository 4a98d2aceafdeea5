"""A CSV manifest as a table: rows with their line numbers, resolved file paths and metadata."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clinadapt.errors import DataError

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
# Canonical metadata key -> header names (lowercase, "_" for spaces and dashes) that mean it.
META_ALIASES: dict[str, tuple[str, ...]] = {
    "split": ("split", "partition"),
    "domain": ("domain", "site", "center", "centre", "hospital", "institution"),
    "scanner": ("scanner", "manufacturer", "device"),
    "sex": ("sex", "gender"),
    "age_group": ("age_group", "agegroup", "age_bin"),
    "patient_id": ("patient_id", "patientid", "patient", "subject_id", "subject"),
}


def as_index(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def header_key(column: str) -> str:
    return column.strip().lower().replace(" ", "_").replace("-", "_")


def metadata_columns(fields: list[str], skip: set[str]) -> dict[str, str]:
    """Map each metadata key to its CSV column: canonical keys by alias, others as named."""
    out: dict[str, str] = {}
    rest = [c for c in fields if c not in skip]
    for key, aliases in META_ALIASES.items():
        for alias in aliases:  # the first alias present wins (the canonical name comes first)
            col = next((c for c in rest if header_key(c) == alias), None)
            if col is not None:
                out[key] = col
                rest.remove(col)
                break
    for col in rest:
        key = col.strip()
        if key and key not in out:
            out[key] = col
    return out


@dataclass
class ManifestTable:
    """The rows of a CSV manifest; error positions are "file: row i (line l)"."""

    path: Path
    fields: list[str]
    rows: list[dict[str, str]]
    lines: list[int]

    @classmethod
    def read(cls, csv_path: str | Path, required: list[str], hint: str = "") -> ManifestTable:
        """Read ``csv_path``; a missing file or column, no rows or a ragged row is a DataError."""
        path = Path(csv_path).expanduser()
        where = str(path)
        if not path.is_file():
            raise DataError(f"{where}: no such manifest file")
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                fields = [c for c in (reader.fieldnames or [])]
                rows, lines = [], []
                for row in reader:
                    rows.append(row)
                    lines.append(reader.line_num)
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{where}: not a readable CSV ({type(e).__name__}: {e})") from e
        if not fields or not any(c.strip() for c in fields):
            raise DataError(f"{where}: the CSV is empty (no header row)")
        if not rows:
            raise DataError(f"{where}: the CSV has a header ({', '.join(fields)}) but no rows")
        missing = [c for c in required if c not in fields]
        if missing:
            raise DataError(
                f"{where}: missing column(s) {missing}; the columns are {fields}"
                + (f" ({hint})" if hint else "")
            )
        table = cls(path, fields, rows, lines)
        for i, row in enumerate(rows):
            if None in row:
                raise DataError(
                    f"{table.at(i)} has more cells than the header's {len(fields)} columns"
                )
        return table

    def __len__(self) -> int:
        return len(self.rows)

    def at(self, i: int) -> str:
        return f"{self.path}: row {i + 1} (line {self.lines[i]})"

    def cell(self, i: int, col: str) -> str:
        return (self.rows[i].get(col) or "").strip()

    def column(self, col: str) -> list[str]:
        return [self.cell(i, col) for i in range(len(self))]

    def has(self, col: str) -> bool:
        """Whether the column exists and holds at least one value."""
        return col in self.fields and any(self.column(col))

    def paths(
        self, col: str, base: Path, slices: list[int | None] | None = None, what: str = "image"
    ) -> list[str]:
        """Column ``col`` as paths (relative ones under ``base``); all must exist, none repeat."""
        slices = slices or [None] * len(self)
        paths: list[str] = []
        for i in range(len(self)):
            text = self.cell(i, col)
            if not text:
                raise DataError(f"{self.at(i)} has an empty {col!r}")
            p = Path(text).expanduser()
            paths.append(str(p if p.is_absolute() else base / p))
        absent = [p for p in dict.fromkeys(paths) if not Path(p).is_file()]
        if absent:
            more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            raise DataError(
                f"{self.path}: {len(absent)} {what} path(s) do not exist (relative paths are read "
                f"from {base}): {', '.join(absent[:5])}{more}"
            )
        seen: dict[tuple[str, int | None], list[int]] = {}
        for i, key in enumerate(zip(paths, slices, strict=True)):
            seen.setdefault(key, []).append(i + 1)
        dups = [(k, r) for k, r in seen.items() if len(r) > 1]
        if dups:
            desc = "; ".join(
                f"{p}{'' if s is None else f' slice {s}'} (rows {', '.join(map(str, r))})"
                for (p, s), r in dups[:5]
            )
            raise DataError(f"{self.path}: {len(dups)} duplicate {what} path(s): {desc}")
        return paths

    def slices(self, col: str = "slice") -> list[int | None]:
        """Per-row slice numbers from ``col`` (None where empty or absent)."""
        out: list[int | None] = []
        for i in range(len(self)):
            text = self.cell(i, col) if col in self.fields else ""
            k = as_index(text) if text else None
            if text and (k is None or k < 0):
                raise DataError(f"{self.at(i)}: slice {text!r} is not a non-negative integer")
            out.append(k)
        return out

    def metadata(self, skip: set[str]) -> dict[str, np.ndarray]:
        """Every column not in ``skip``, canonical keys by alias; splits checked and normalised."""
        metadata: dict[str, np.ndarray] = {}
        for key, col in metadata_columns(self.fields, skip).items():
            values = self.column(col)
            if key == "split":
                for i, v in enumerate(values):
                    if v.lower() not in SPLIT_ALIASES:
                        raise DataError(
                            f"{self.at(i)}: split {v!r} in column {col!r} is not one of train, "
                            "val, test"
                        )
                values = [SPLIT_ALIASES[v.lower()] for v in values]
            elif key in ("domain", "scanner", "sex", "age_group"):
                values = [v or "unknown" for v in values]
            metadata[key] = np.array(values, dtype=str)
        return metadata
