"""Test-time adaptation for segmentation (each module registers itself)."""

from clinadapt.methods.tta.seg import intent, tent  # noqa: F401
