"""What a volume backbone expects as input: its patch size, channels and intensity normalisation.

Volumes arrive as float32 (X,Y,Z) arrays in [0, 1] (the reader's window). A volume model resizes
each to its ``volume_size`` (trilinear) and normalises it: ``zscore`` per volume (nnU-Net's
``ZScoreNormalization``, the rule of OpenMind's pre-training and of nnU-Net for MRI), or
``unit`` (the [0, 1] window as it is, as MONAI's SwinUNETR recipes use after
``ScaleIntensityRange``). A 2D backbone applied slice by slice takes ``slices`` axial slices,
each through the 2D model's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from clinadapt.errors import DataError

Intensity = Literal["zscore", "unit"]


def _as_volumes(volumes: Sequence[np.ndarray] | np.ndarray | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(volumes, torch.Tensor):
        volumes = [v for v in volumes]
    out = []
    for v in volumes:
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3:
            raise DataError(
                f"a volume model takes (X,Y,Z) volumes, got an array of shape {tuple(t.shape)}; "
                "2D images need a 2D model"
            )
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif not t.is_floating_point():
            raise DataError(f"volumes must be float in [0,1] or uint8, got {t.dtype}")
        out.append(t.float())
    return out


@dataclass(frozen=True)
class VolumePreprocessing:
    """Patch size (X,Y,Z), input channels and intensity normalisation of a volume backbone."""

    volume_size: tuple[int, int, int] = (32, 32, 32)
    in_chans: int = 1
    intensity: Intensity = "zscore"
    interpolation: str = "trilinear"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "volume", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VolumePreprocessing:
        d = {k: v for k, v in data.items() if k != "kind"}
        d["volume_size"] = tuple(int(v) for v in d.get("volume_size", (32, 32, 32)))
        return cls(**d)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Intensity rule on a float (N,C,X,Y,Z) batch (each volume on its own)."""
        if self.intensity == "unit":
            return x
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True)
        return (x - mean) / std.clamp_min(1e-8)  # nnU-Net: (x - mean) / max(std, 1e-8)

    def resize(self, v: torch.Tensor) -> torch.Tensor:
        """One (X,Y,Z) volume at ``volume_size`` as (1,X,Y,Z)."""
        if tuple(v.shape) == tuple(self.volume_size):
            return v[None]
        return F.interpolate(
            v[None, None], size=self.volume_size, mode=self.interpolation, align_corners=False
        )[0]

    def __call__(self, volumes: Sequence[np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Float (X,Y,Z) volumes in [0, 1] -> the normalised (N,C,X,Y,Z) batch."""
        vols = _as_volumes(volumes)
        x = torch.stack([self.resize(v) for v in vols])
        if self.in_chans > 1:
            x = x.expand(-1, self.in_chans, -1, -1, -1)
        return self.normalise(x)

    def model_input(self, patch: torch.Tensor) -> torch.Tensor:
        """Normalise a float (N,1,X,Y,Z) batch of patches already at the model's grid."""
        if self.in_chans > 1:
            patch = patch.expand(-1, self.in_chans, -1, -1, -1)
        return self.normalise(patch)


__all__ = ["Intensity", "VolumePreprocessing"]
