"""The target registry (what to adapt), declared in ``targets.json``: listing it imports no torch."""

from __future__ import annotations

from pathlib import Path

from clinadapt._registry import Registry

TARGETS: Registry = Registry("target", Path(__file__).with_name("targets.json"))
