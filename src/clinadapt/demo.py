"""The demo's experiments: the whole loop on the built-in data, offline, in about a minute."""

from __future__ import annotations

import os
import time
from typing import Any

from clinadapt.config import RunConfig

# (method, shift, shift options): the source model first, so the others reuse it
_CORRUPTED = {"source": "site-a"}
PLAN: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("finetune", "domain", {}),
    ("bn", "domain", {}),
    ("tent", "domain", {}),
    ("source", "corruption", _CORRUPTED),
    ("bn", "corruption", _CORRUPTED),
    ("tent", "corruption", _CORRUPTED),
)


def demo_configs(out_dir: str, seed: int = 0, **fields: Any) -> list[RunConfig]:
    """The demo's run configurations (tiny-resnet trained on site-a of clinical-shift, tested
    on every site and under X-ray artefacts, as it is and with bn and tent); ``fields`` sets
    other run-configuration fields of every run, e.g. ``device="cuda"``."""
    return [
        RunConfig(
            method=method,
            shift=shift,
            shift_options=dict(options),
            seed=seed,
            out_dir=out_dir,
            **fields,
        )
        for method, shift, options in PLAN
    ]


def seconds_since_process_start() -> float | None:
    """Wall-clock seconds since this process started (Linux ``/proc``), else None."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        start_ticks = int(after_name[19])  # field 22 of proc(5), counted after the name
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Stopwatch:
    """Seconds since the process started where the system says, else since this was made."""

    def __init__(self) -> None:
        self.made = time.perf_counter()
        self.offset = seconds_since_process_start() or 0.0

    def seconds(self) -> float:
        return self.offset + time.perf_counter() - self.made
