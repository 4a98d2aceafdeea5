"""Segmentation methods: zero-shot, fine-tuning, few-shot fine-tuning, and the U-Net baseline."""

from clinadapt.methods.seg import sam, unet  # noqa: F401  (registrations)
from clinadapt.methods.seg.base import SegMethod, SegPredictions, fill_boxes

__all__ = ["SegMethod", "SegPredictions", "fill_boxes"]
