"""The registry of promptable segmenters, read from ``segmenters.json`` (no torch needed).

A registry of its own rather than entries of the backbone registry (``MODELS``): a segmenter
takes images and prompts and gives masks, a backbone takes images and gives feature vectors,
and methods, targets and the CLI treat the two differently. ``sam-vit-b`` and ``medsam`` in
``MODELS`` stay the image encoders alone (for classification); the same names here are the whole
promptable models, and both read ``$CLINADAPT_MODEL_DIR/<name>/``, so one download serves both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinadapt._registry import Registry

SPEC_FILE = Path(__file__).with_name("segmenters.json")


@dataclass(frozen=True)
class SegmenterSpec:
    """A promptable segmenter: family, preprocessing rule, architecture and weight sources."""

    name: str
    family: str  # "sam" (transformers SamModel) or "sam2" (Sam2Model)
    rule: str  # "sam", "medsam" or "sam2" (segmentation/preprocess.py)
    config: dict[str, Any] = field(default_factory=dict)
    repo: str | None = None  # transformers-format hub repo
    url: str | None = None  # a segment-anything checkpoint
    checkpoint: str | None = None  # the published checkpoint's file name
    checkpoint_from: str | None = None
    description: str = ""
    tiny: bool = False
    seed: int = 0


SEGMENTERS: Registry[SegmenterSpec] = Registry("segmenter")


def _load_specs() -> None:
    data = json.loads(SPEC_FILE.read_text())
    configs = data["configs"]
    for name, entry in data["segmenters"].items():
        entry = dict(entry)
        config = configs[entry.pop("config")]
        spec = SegmenterSpec(name=name, config=config, **entry)
        tags = (spec.family, spec.rule) + (("tiny",) if spec.tiny else ())
        SEGMENTERS.register(name, spec, help=spec.description, tags=tags)


_load_specs()


def list_segmenters() -> list[str]:
    """Registered segmenter names, sorted."""
    return SEGMENTERS.names()
