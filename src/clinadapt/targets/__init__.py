"""What to adapt: targets registered by short name (head, norm, lora, adapter, prompt, ...)."""

from clinadapt.targets import (  # noqa: F401  (registrations)
    adapter,
    basic,
    last_k,
    lora,
    prompt,
    segmenter,
    text_prompt,
)
from clinadapt.targets.base import (
    TARGETS,
    Target,
    TargetInfo,
    TargetOptions,
    apply_target,
    count_parameters,
)
from clinadapt.targets.io import load_adapted, save_adapted
from clinadapt.targets.lora import merge_and_unload_lora, merge_lora, unmerge_lora
from clinadapt.targets.temperature import adaptive_softmax, enable_adaptive_temperature

__all__ = [
    "TARGETS",
    "Target",
    "TargetInfo",
    "TargetOptions",
    "adaptive_softmax",
    "apply_target",
    "count_parameters",
    "enable_adaptive_temperature",
    "load_adapted",
    "merge_and_unload_lora",
    "merge_lora",
    "save_adapted",
    "unmerge_lora",
]
