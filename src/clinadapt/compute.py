"""Where and at which precision a run computes: ``--device auto`` and ``--precision``.

``auto`` takes CUDA, else Apple MPS, else the CPU. ``bf16`` and ``fp16`` run the forward passes
under ``torch.autocast`` (mixed precision: weights, optimiser state and gradients stay float32);
``fp16`` also scales the loss (``torch.amp.GradScaler``) where clinadapt runs the training loop
itself (``finetune`` and pre-training), so small gradients do not underflow. bf16 needs no
scaling and works on the CPU too; fp16 needs a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field

from clinadapt.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
#: the config fields (run and pre-training configs alike)
DeviceField = Annotated[
    str, Field(description="torch device: auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
]
PrecisionField = Annotated[
    Precision,
    Field(
        description="fp32, or mixed precision (autocast) of training, test-time adaptation and "
        "inference: bf16 (CPU or GPU) or fp16 (GPU, loss scaled)"
    ),
]


def resolve_device(name: str | None = "auto") -> str:
    """The torch device to use for ``name``: ``auto`` -> cuda, else mps, else cpu.

    An explicit device that is not there (``cuda`` on a machine without a visible GPU) is an
    error that says what is available, before any work starts.
    """
    import torch

    name = (name or "auto").strip().lower()
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(
            f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, mps)"
        ) from e
    available = "cpu" + (", cuda" if cuda else "") + (", mps" if mps else "")
    if device.type == "cuda":
        if not cuda:
            raise ConfigError(
                f"--device {name}: no CUDA GPU is visible here (available: {available})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type == "mps" and not mps:
        raise ConfigError(f"--device mps: Apple MPS is not available here (available: {available})")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: clinadapt runs on cpu, cuda or mps")
    return name


def check_precision(precision: str, device: str) -> None:
    """Refuse a precision the device cannot run, saying what to use instead."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: one of {', '.join(PRECISIONS)}")
    kind = device.split(":")[0]
    if precision == "fp16" and kind == "cpu":
        raise ConfigError("--precision fp16 needs a GPU (cuda or mps); on the CPU use bf16")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use fp16")


def autocast_dtype(precision: str) -> Any:
    """The torch dtype autocast runs at, or None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


@contextlib.contextmanager
def autocast(device: str, precision: str) -> Iterator[None]:
    """Mixed precision for the forward passes inside (nothing for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    import torch

    # cache_enabled=False: autocast otherwise keeps the low-precision copy of each weight until
    # the outermost autocast region exits, so a model trained inside one region (the runner wraps
    # fit, adaptation and prediction in one) would go on computing with its initial weights after
    # every optimiser step
    with torch.autocast(device_type=device.split(":")[0], dtype=dtype, cache_enabled=False):
        yield


def grad_scaler(device: str, precision: str) -> Any:
    """A ``torch.amp.GradScaler`` that is enabled for fp16 only (a pass-through otherwise)."""
    import torch

    return torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")


def active_autocast(device: str) -> str | None:
    """The autocast dtype in force on ``device`` right now (for cache keys), or None."""
    import torch

    kind = device.split(":")[0]
    if not torch.is_autocast_enabled(kind):
        return None
    return str(torch.get_autocast_dtype(kind)).removeprefix("torch.")


def describe(requested: str | None, device: str, precision: str) -> dict[str, Any]:
    """What the record says about the compute: device asked for and used, precision, GPU name."""
    import torch

    out: dict[str, Any] = {
        "device": device,
        "device_requested": requested or "auto",
        "precision": precision,
        "autocast": autocast_dtype(precision) is not None,
    }
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out
