"""What a backbone expects as input, as plain data (the pixel work lives in ``models.stages``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from clinadapt.models.stages import HostBatch

# ITU-R BT.601 luma weights: the rule for turning an RGB image into one grey channel.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects as input: size, channels and normalisation.

    Channel rule (applied by :meth:`__call__`): a grey image given to a 3-channel model is
    replicated into R, G and B (the convention of CheXpert/MedMNIST pipelines, which keeps the
    pretrained per-channel normalisation meaningful); an RGB image given to a 1-channel model is
    reduced to its BT.601 luma; an alpha channel is dropped. Any other channel count must match
    the model exactly, or the call fails naming both counts.
    """

    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    in_chans: int = 3
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict` (lists from JSON become tuples)."""
        d = dict(data)
        for key in ("image_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def __call__(self, images: torch.Tensor | np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """Turn uint8 images (N,H,W), (N,H,W,C) or a list of (H,W[,C]) into a normalised batch."""
        from clinadapt.models.stages import device_stage, host_stage

        return device_stage(self, host_stage(self, images))

    def host_stage(self, images: torch.Tensor | np.ndarray | Sequence[np.ndarray]) -> HostBatch:
        """The part of :meth:`__call__` for the host (DataLoader workers): uint8 images stacked
        at their own size, alpha dropped (see :mod:`clinadapt.models.stages`)."""
        from clinadapt.models.stages import host_stage

        return host_stage(self, images)

    def device_stage(
        self, batch: HostBatch, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """The rest of :meth:`__call__`, on ``device``: copy, float, channels, resize, normalise."""
        from clinadapt.models.stages import device_stage

        return device_stage(self, batch, device)
