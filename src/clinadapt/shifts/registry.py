"""The shift registry (shift protocols), declared in ``shifts.json``: listing it imports no torch."""

from __future__ import annotations

from pathlib import Path

from clinadapt._registry import Registry

SHIFTS: Registry = Registry("shift", Path(__file__).with_name("shifts.json"))
