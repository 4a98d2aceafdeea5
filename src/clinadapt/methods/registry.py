"""The method registry (how to adapt), declared in ``methods.json``: listing it imports no torch."""

from __future__ import annotations

from pathlib import Path

from clinadapt._registry import Registry

METHODS: Registry = Registry("method", Path(__file__).with_name("methods.json"))
