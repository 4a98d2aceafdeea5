"""What to adapt: targets registered by short name (head, norm, lora, adapter, prompt, ...).

Declared in ``targets.json``; each target's module is imported the first time it is used.
"""

from clinadapt._lazy import lazy_exports
from clinadapt.targets.registry import TARGETS

_BASE = (
    "Target",
    "TargetInfo",
    "TargetOptions",
    "apply_target",
    "check_target",
    "count_parameters",
)
__getattr__ = lazy_exports(
    __name__,
    {name: "clinadapt.targets.base" for name in _BASE}
    | {name: "clinadapt.targets.io" for name in ("load_adapted", "save_adapted")}
    | {
        name: "clinadapt.targets.lora"
        for name in ("merge_and_unload_lora", "merge_lora", "unmerge_lora")
    }
    | {
        name: "clinadapt.targets.temperature"
        for name in ("adaptive_softmax", "enable_adaptive_temperature")
    },
)

__all__ = [
    "TARGETS",
    "Target",
    "TargetInfo",
    "TargetOptions",
    "adaptive_softmax",
    "apply_target",
    "check_target",
    "count_parameters",
    "enable_adaptive_temperature",
    "load_adapted",
    "merge_and_unload_lora",
    "merge_lora",
    "save_adapted",
    "unmerge_lora",
]
