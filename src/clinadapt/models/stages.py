"""Preprocessing in two stages: uint8 batches on the host, the float work on the model's device.

A GPU trains faster than a CPU can turn images into normalised float32 batches, and a float32
batch is 4x the bytes of the uint8 images it came from (12x for grey images given to an RGB
model). So the host stage (DataLoader workers, pinned memory) only stacks the images as uint8
(N,H,W,C) at their own size and drops an alpha channel; the device stage copies that batch to the
device (``non_blocking``) and does everything in float there: scaling to [0,1], the grey<->RGB
rule, the resize to the model's size and the mean/std normalisation. On the CPU the two stages in
a row are the one-step preprocessing, value for value.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from clinadapt.errors import DataError
from clinadapt.models.preprocessing import LUMA_WEIGHTS

if TYPE_CHECKING:
    from clinadapt.models.preprocessing import Preprocessing

Images = torch.Tensor | np.ndarray | Sequence[np.ndarray]


@dataclass(frozen=True)
class HostBatch:
    """Images as the host stage leaves them: ``parts[k]`` stacks the images of one shape as
    (n_k, H, W, C), uint8 (or float in [0, 1] when given so), in batch order when ``index`` is
    None, else ``index[k]`` holds their positions in the batch (mixed sizes)."""

    parts: tuple[torch.Tensor, ...]
    index: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels a copy to the device moves."""
        return sum(p.numel() * p.element_size() for p in self.parts)

    def pin_memory(self) -> HostBatch:
        """The same batch in page-locked memory (what ``DataLoader(pin_memory=True)`` calls)."""
        index = None if self.index is None else tuple(i.pin_memory() for i in self.index)
        return HostBatch(tuple(p.pin_memory() for p in self.parts), index)


def host_stage(pp: Preprocessing, images: Images) -> HostBatch:
    """Stack uint8 images (N,H,W), (N,H,W,C) or a list of (H,W[,C]) arrays, of one size or of
    several, as (N,H,W,C) per size; drop an alpha channel the model does not take. A channel
    count the model cannot take fails here, before any copy."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(im) for im in images]
        shapes = [a.shape for a in arrays]
        if len(set(shapes)) > 1:
            return _mixed(pp, arrays, shapes)
        if not arrays:
            raise DataError("no images to preprocess: the list is empty")
        images = np.stack(arrays)
    if not isinstance(images, torch.Tensor):
        array = np.asarray(images)  # read-only (cached datasets): torch needs its own copy
        images = torch.as_tensor(array if array.flags.writeable else array.copy())
    t = images
    if t.ndim == 3:  # N,H,W grey
        t = t.unsqueeze(-1)
    if t.ndim != 4:
        raise DataError(f"expected images as (N,H,W) or (N,H,W,C), got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise DataError(f"images must be uint8 or float in [0,1], got dtype {t.dtype}")
    c = t.shape[-1]
    if c == 4 and pp.in_chans != 4:  # RGBA: the alpha channel never reaches the model
        t, c = t[..., :3], 3
    if c != pp.in_chans and (c, pp.in_chans) not in ((1, 3), (3, 1)):
        raise DataError(
            f"images have {c} channels but the model takes {pp.in_chans}; only grey<->RGB is "
            "converted automatically"
        )
    return HostBatch((t.contiguous(),))


def _mixed(pp: Preprocessing, arrays: list[np.ndarray], shapes: list[tuple]) -> HostBatch:
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    parts, index = [], []
    for pos in groups.values():
        parts.extend(host_stage(pp, np.stack([arrays[i] for i in pos])).parts)
        index.append(torch.as_tensor(pos, dtype=torch.long))
    return HostBatch(tuple(parts), tuple(index))


def device_stage(
    pp: Preprocessing, batch: HostBatch, device: str | torch.device | None = None
) -> torch.Tensor:
    """The normalised float32 (N,C,H,W) batch ``pp`` describes, computed on ``device`` (None:
    where the batch is) after one ``non_blocking`` copy of its uint8 pixels."""
    outs = [
        _finish(pp, p if device is None else p.to(device, non_blocking=True)) for p in batch.parts
    ]
    if batch.index is None:
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    out = outs[0].new_empty((len(batch), *outs[0].shape[1:]))
    for pos, x in zip(batch.index, outs, strict=True):
        out[pos.to(out.device, non_blocking=True)] = x
    return out


def _finish(pp: Preprocessing, t: torch.Tensor) -> torch.Tensor:
    x = t.permute(0, 3, 1, 2)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    # grey for an RGB model: resize the one channel, then replicate it (the same values)
    replicate = x.shape[1] == 1 and pp.in_chans == 3
    if not replicate:
        x = adapt_channels(x, pp.in_chans)
    if tuple(x.shape[-2:]) != tuple(pp.image_size):
        mode = pp.interpolation if pp.interpolation in ("bilinear", "bicubic") else "bilinear"
        x = F.interpolate(x, size=pp.image_size, mode=mode, align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    if replicate:
        x = adapt_channels(x, pp.in_chans)
    mean = constant(pp.mean, x.device).view(1, -1, 1, 1)
    std = constant(pp.std, x.device).view(1, -1, 1, 1)
    if mean.shape[1] != x.shape[1]:
        mean = mean.mean().expand(1, x.shape[1], 1, 1)
        std = std.mean().expand(1, x.shape[1], 1, 1)
    return (x - mean) / std


@functools.lru_cache(maxsize=64)
def constant(
    values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``values`` as a ``dtype`` tensor on ``device``, made once: a tensor made from Python
    numbers is copied from pageable memory, and such a copy to a GPU waits for the work queued
    before it (at every batch, the training step in flight). Never change it in place."""
    return torch.tensor(values, dtype=dtype).to(device)


def adapt_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Apply the documented grey<->RGB rule to a float (N,C,H,W) batch."""
    c = x.shape[1]
    if c == 4 and in_chans != 4:  # RGBA: drop alpha
        x, c = x[:, :3], 3
    if c == in_chans:
        return x
    if c == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and in_chans == 1:
        w = constant(LUMA_WEIGHTS, x.device, x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise DataError(
        f"images have {c} channels but the model takes {in_chans}; only grey<->RGB is "
        "converted automatically"
    )
