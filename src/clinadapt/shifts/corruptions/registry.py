"""The corruption registry (acquisition artefacts (tagged with the modalities each fits)), declared in ``corruptions.json``: listing it imports no torch."""

from __future__ import annotations

from pathlib import Path

from clinadapt._registry import Registry

CORRUPTIONS: Registry = Registry("corruption", Path(__file__).with_name("corruptions.json"))
