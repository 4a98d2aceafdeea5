"""DINO (Caron et al., 2021): self-distillation from a momentum teacher over multi-crop views."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clinadapt.models.base import FoundationModel
from clinadapt.progress import status
from clinadapt.ssl.augment import Augmenter
from clinadapt.ssl.base import SSL_METHODS, Options, SSLMethod
from clinadapt.ssl.collective import global_sum, share
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.encode import accepts_size, encode, timm_vit

# Teacher targets whose entropy exceeds this fraction of log K carry almost no information.
COLLAPSE_RATIO = 0.98


class DINOOptions(Options):
    # Defaults from the DINO paper and its main_dino.py; 0.04 is main_dino.py's teacher
    # temperature, raised towards 0.07 (with warm-up) only for long, stable runs.
    out_dim: int | None = Field(
        None,
        ge=2,
        description="prototypes K; default 65536 (paper) for >=384-d backbones, else 16*d",
    )
    hidden_dim: int | None = Field(
        None,
        ge=2,
        description="head MLP width; default 2048 (paper) for >=384-d backbones, else 4*d",
    )
    bottleneck_dim: int | None = Field(
        None, ge=2, description="head bottleneck; default 256 (paper) for >=384-d backbones, else d"
    )
    norm_last_layer: bool = Field(
        True, description="fix the weight-norm gain of the last layer to 1"
    )
    student_temp: float = Field(0.1, gt=0, description="student softmax temperature")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="teacher temperature at the start")
    teacher_temp: float = Field(
        0.04, gt=0, description="teacher temperature after warm-up (paper: 0.04-0.07)"
    )
    warmup_teacher_temp_frac: float = Field(
        0.1,
        ge=0,
        le=1,
        description="fraction of steps for the teacher-temperature warm-up (30/300 epochs)",
    )
    center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA rate of the teacher centre")
    momentum_teacher: float = Field(
        0.996, ge=0, le=1, description="teacher EMA rate at the start; cosine-raised to 1"
    )
    global_crops_scale: tuple[float, float] = Field(
        (0.4, 1.0), description="global crop area range"
    )
    local_crops_number: int = Field(
        6, ge=0, description="local crops per image (paper's best ViT-S uses 10; fewer for CPU)"
    )
    local_crops_scale: tuple[float, float] = Field((0.05, 0.4), description="local crop area range")
    local_crop_size: int | None = Field(
        None, ge=4, description="local crop side; default 96/224 of the global side, patch-rounded"
    )
    freeze_last_layer_steps: int = Field(
        0, ge=0, description="steps during which the last head layer stays fixed (paper: 1 epoch)"
    )
    export: Literal["teacher", "student"] = Field(
        "teacher", description="which backbone to save and evaluate (paper: teacher)"
    )


def dino_loss(
    student_out: list[torch.Tensor],
    teacher_out: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross entropy of every student view against every teacher view of another crop.

    Teacher logits are centred and sharpened (``softmax((t - c) / teacher_temp)``) and carry no
    gradient; views i of the teacher and i of the student (the same global crop) are skipped.
    """
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out]
    logs = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    total, terms = student_out[0].new_zeros(()), 0
    for i, q in enumerate(targets):
        for v, log_p in enumerate(logs):
            if v == i:
                continue
            total = total + (-q * log_p).sum(dim=-1).mean()
            terms += 1
    return total / terms


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight = g * v / ||v|| per output row."""

    def __init__(self, in_dim: int, out_dim: int, fixed_gain: bool) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.v, std=0.02)
        self.g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.g * F.normalize(self.v, dim=1))


class DINOHead(nn.Module):
    """Three-layer GELU MLP, L2-normalised bottleneck, weight-normalised prototype layer."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, norm_last_layer: bool
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, fixed_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_temperature(opts: DINOOptions, step: int, total: int) -> float:
    """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
    warm = round(opts.warmup_teacher_temp_frac * total)
    if step >= warm or warm == 0:
        return opts.teacher_temp
    return opts.warmup_teacher_temp + (opts.teacher_temp - opts.warmup_teacher_temp) * step / warm


def teacher_momentum(opts: DINOOptions, step: int, total: int) -> float:
    """Cosine schedule of the EMA rate from ``momentum_teacher`` to 1."""
    frac = min(step / max(total, 1), 1.0)
    return 1 - (1 - opts.momentum_teacher) * (math.cos(math.pi * frac) + 1) / 2


@SSL_METHODS.register(
    "dino", help="DINO: self-distillation with a momentum teacher, centring and multi-crop"
)
class DINO(SSLMethod):
    """A student matches a centred, sharpened momentum teacher across global and local crops."""

    name = "dino"
    Options = DINOOptions
    base_lr = 5e-4  # DINO: lr = 0.0005 * batch/256 with AdamW
    weight_decay = 0.04  # DINO's starting weight decay
    clip_grad = 3.0  # DINO's gradient clipping
    options: DINOOptions

    def __init__(self, backbone: FoundationModel, options: DINOOptions, augment: Augmenter) -> None:
        super().__init__(backbone, options, augment)
        d = backbone.feature_dim
        big = d >= 384
        out_dim = options.out_dim or (65536 if big else 16 * d)
        hidden = options.hidden_dim or (2048 if big else 4 * d)
        bottleneck = options.bottleneck_dim or (256 if big else d)
        self.head = DINOHead(d, out_dim, hidden, bottleneck, options.norm_last_layer)
        self.teacher = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        for p in [*self.teacher.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.global_size = int(backbone.preprocess.image_size[0])
        self.local_size = self._local_size(options)
        self.last_teacher_temp = options.warmup_teacher_temp
        self.last_target_entropy = float("nan")
        self.last_top_share = float("nan")

    def _local_size(self, opts: DINOOptions) -> int:
        size = opts.local_crop_size
        if size is None:
            size = round(self.global_size * 96 / 224)  # DINO: 96-pixel local crops at 224
            vit = timm_vit(self.backbone)
            if vit is not None:
                p = int(vit.patch_embed.patch_size[0])
                size = max(p, round(size / p) * p)
        if opts.local_crops_number and not accepts_size(self.backbone, size):
            status(
                f"dino: {self.backbone.name!r} takes only {self.global_size}x{self.global_size} "
                "inputs; local crops are resized to that size"
            )
            size = self.global_size
        return size

    def training_loss(
        self, images: torch.Tensor, gen: ImageDraws, step: int, total: int
    ) -> torch.Tensor:
        o = self.options
        glob = torch.cat(
            [
                self.augment.view(images, self.global_size, o.global_crops_scale, gen)
                for _ in range(2)
            ]
        ).to(self.device)
        student = [self.head(encode(self.backbone, glob))]
        if o.local_crops_number:
            local = torch.cat(
                [
                    self.augment.view(images, self.local_size, o.local_crops_scale, gen)
                    for _ in range(o.local_crops_number)
                ]
            ).to(self.device)
            student.append(self.head(encode(self.backbone, local)))
        with torch.no_grad():
            teacher = self.teacher_head(encode(self.teacher, glob))
        n = images.shape[0]
        student_views = list(torch.cat(student).split(n))
        teacher_views = list(teacher.split(n))
        self.last_teacher_temp = teacher_temperature(o, step, total)
        loss = dino_loss(
            student_views, teacher_views, self.center, o.student_temp, self.last_teacher_temp
        )
        self._observe(teacher)
        self._update_center(teacher)
        return share(loss, n)  # this process's part of the global batch's mean

    @torch.no_grad()
    def _observe(self, teacher_out: torch.Tensor) -> None:
        """Entropy of the teacher targets and the most used prototype's share, over the global
        batch."""
        q = F.softmax((teacher_out.float() - self.center) / self.last_teacher_temp, dim=-1)
        entropy = -(q * q.clamp_min(1e-12).log()).sum(-1)
        votes = torch.bincount(q.argmax(-1), minlength=q.shape[1]).to(torch.float64)
        sums = global_sum(
            torch.cat([votes, torch.stack([entropy.sum().double(), votes.new_tensor(len(q))])])
        )
        rows = float(sums[-1])
        self.last_target_entropy = float(sums[-2]) / rows
        self.last_top_share = float(sums[:-2].max()) / rows

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher outputs' mean over the global batch (DINO's all-reduced centre)."""
        m = self.options.center_momentum
        t = teacher_out.float()
        sums = global_sum(torch.cat([t.sum(dim=0), t.new_tensor([len(t)])]))
        self.center.mul_(m).add_((sums[:-1] / sums[-1]).unsqueeze(0), alpha=1 - m)

    def before_optimizer_step(self, step: int, total: int) -> None:
        if step < self.options.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        m = teacher_momentum(self.options, step, total)
        pairs = [(self.backbone, self.teacher), (self.head, self.teacher_head)]
        for student, teacher in pairs:
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def export_backbone(self) -> FoundationModel:
        return self.teacher if self.options.export == "teacher" else self.backbone

    def diagnostics(self) -> dict[str, Any]:
        """Teacher-target entropy (uniform collapse near log K) and the most used prototype's share."""
        k = int(self.center.shape[1])
        ratio = self.last_target_entropy / math.log(k)
        return {
            "teacher_target_entropy": self.last_target_entropy,
            "entropy_of_uniform": math.log(k),
            "top_prototype_share": self.last_top_share,
            # DINO's two failure modes: every target uniform, or every image on one prototype
            "collapsed": bool(ratio > COLLAPSE_RATIO or self.last_top_share > COLLAPSE_RATIO),
        }

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "out_dim": int(self.center.shape[1]),
            "local_crop_size": self.local_size,
            "teacher_temp": self.last_teacher_temp,
        }
