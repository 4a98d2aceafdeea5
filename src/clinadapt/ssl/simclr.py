"""SimCLR (Chen et al., 2020): agree across two augmented views through a projection MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clinadapt.models.base import FoundationModel
from clinadapt.ssl.augment import Augmenter
from clinadapt.ssl.base import SSL_METHODS, Options, SSLMethod
from clinadapt.ssl.collective import batch_places, gather_batch
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.encode import encode


class SimCLROptions(Options):
    # SimCLR appendix B.9: temperature 0.5 was best for the small-image, small-batch
    # (CIFAR-10) setting, which is closer to CPU-sized clinical runs than 0.1 at batch 4096.
    temperature: float = Field(0.5, gt=0, le=2, description="NT-Xent softmax temperature")
    proj_dim: int = Field(128, ge=2, description="projection output size (SimCLR: 128)")
    proj_hidden: int | None = Field(
        None, ge=2, description="projection hidden size; default: the backbone's feature size"
    )
    # SimCLR crops 8-100% of natural images; an 8% crop of a radiograph often holds no finding
    # at all, so the lower bound is DINO's global-crop 0.4 (and the probe test confirms it).
    crop_scale: tuple[float, float] = Field(
        (0.4, 1.0), description="area fraction range of the random resized crops (SimCLR: 0.08-1)"
    )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross entropy over 2N views; view i's positive is its twin.

    Under several processes ``z1``, ``z2`` are this process's part of the global batch: its
    views are scored against all 2N views of the global batch (the negatives of one process,
    gathered with gradient) and the result is its share of the global batch's mean.
    """
    q1, q2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    k = torch.cat([gather_batch(q1), gather_batch(q2)])
    places, n = batch_places(len(z1), z1.device)
    sim = torch.cat([q1, q2]) @ k.T / temperature
    rows = torch.arange(2 * len(z1), device=z1.device)
    self_sim = torch.zeros_like(sim, dtype=torch.bool)
    self_sim[rows, torch.cat([places, places + n])] = True
    sim = sim.masked_fill(self_sim, float("-inf"))
    twin = torch.cat([places + n, places])
    return F.cross_entropy(sim, twin, reduction="sum") / (2 * n)


class ProjectionMLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear, as SimCLR's projection head g(.)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@SSL_METHODS.register("simclr", help="SimCLR: contrastive NT-Xent loss on two augmented views")
class SimCLR(SSLMethod):
    """Two views per image; their projections attract, all other views in the batch repel."""

    name = "simclr"
    Options = SimCLROptions
    # SimCLR trains with LARS at 0.3 * batch/256; with AdamW a smaller rate is the usual choice.
    base_lr = 1e-3
    weight_decay = 1e-6  # SimCLR's weight decay
    options: SimCLROptions

    def __init__(
        self, backbone: FoundationModel, options: SimCLROptions, augment: Augmenter
    ) -> None:
        super().__init__(backbone, options, augment)
        d = backbone.feature_dim
        self.projector = ProjectionMLP(d, options.proj_hidden or d, options.proj_dim)
        self.size = int(backbone.preprocess.image_size[0])

    def views(self, images: torch.Tensor, gen: ImageDraws) -> list[torch.Tensor]:
        """Two independently augmented views of every image."""
        scale = tuple(self.options.crop_scale)
        return [self.augment.view(images, self.size, scale, gen) for _ in range(2)]

    def training_loss(
        self, images: torch.Tensor, gen: ImageDraws, step: int, total: int
    ) -> torch.Tensor:
        v1, v2 = self.views(images, gen)
        z = self.projector(encode(self.backbone, torch.cat([v1, v2]).to(self.device)))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.options.temperature)
