"""Promptable segmentation: SAM, MedSAM and SAM 2, their prompts and preprocessing.

``load_segmenter(name)`` gives a :class:`Segmenter`; ``segmenter.segment(image, boxes=...,
points=..., point_labels=..., mask=...)`` returns masks at the image's resolution, and
``embed``/``predict`` reuse one image embedding for many prompts. Names resolve lazily, so
listing ``SEGMENTERS`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ImageEmbedding": "base",
    "ModelPrompts": "base",
    "SegmentationOutput": "base",
    "Segmenter": "base",
    "choose_mask": "base",
    "take": "base",
    "Frame": "preprocess",
    "SegPreprocessing": "preprocess",
    "DefaultPrompt": "prompts",
    "DerivedPrompts": "prompts",
    "Prompts": "prompts",
    "make_prompts": "prompts",
    "prompts_for": "prompts",
    "prompts_from_mask": "prompts",
    "read_prompts": "prompts",
    "write_prompts": "prompts",
    "SEGMENTERS": "specs",
    "SegmenterSpec": "specs",
    "list_segmenters": "specs",
    "load_segmenter": "load",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'clinadapt.segmentation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clinadapt.segmentation.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
