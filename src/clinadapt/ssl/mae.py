"""MAE (He et al., 2022): reconstruct masked patches of a timm ViT with a small decoder."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from clinadapt.models.base import FoundationModel
from clinadapt.ssl.augment import Augmenter
from clinadapt.ssl.base import SSL_METHODS, Options, SSLMethod
from clinadapt.ssl.collective import share
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.encode import patch_size, require_timm_vit, vit_tokens


class MAEOptions(Options):
    # Defaults from the MAE paper (ViT-B pre-training recipe).
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of patches masked")
    norm_pix_loss: bool = Field(
        True, description="regress per-patch normalised pixels (mean 0, variance 1)"
    )
    decoder_dim: int = Field(512, ge=8, description="decoder width (paper: 512)")
    decoder_depth: int = Field(8, ge=1, description="decoder transformer blocks (paper: 8)")
    decoder_heads: int = Field(16, ge=1, description="decoder attention heads (paper: 16)")
    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="random resized crop area range (paper: 0.2-1)"
    )


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, (h*w, dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    ys, xs = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )

    def axis(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([axis(ys), axis(xs)], axis=1)
    return torch.as_tensor(emb, dtype=torch.float32)


def patchify(images: torch.Tensor, p: tuple[int, int]) -> torch.Tensor:
    """(N,C,H,W) -> (N, L, ph*pw*C), patches in row-major order as the patch embedding sees them."""
    n, c, h, w = images.shape
    ph, pw = p
    x = images.reshape(n, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // ph) * (w // pw), ph * pw * c)


def random_masking(
    length: int, ratio: float, gen: ImageDraws
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image random patch subsets, one image per generator of ``gen``: (kept indices,
    restore order, mask with 1 = masked)."""
    n = len(gen)
    keep_n = max(1, int(length * (1 - ratio)))
    noise = gen.rand(length)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(n, length)
    mask[:, :keep_n] = 0
    mask = torch.gather(mask, 1, restore)
    return shuffle[:, :keep_n], restore, mask


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool
) -> torch.Tensor:
    """Mean squared error on masked patches only; optionally against normalised patches."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5  # MAE's eps
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


@SSL_METHODS.register("mae", help="MAE: masked autoencoding of timm ViTs (mask 75%)")
class MAE(SSLMethod):
    """Encode the visible 25% of patches; a light decoder predicts the pixels of the rest."""

    name = "mae"
    Options = MAEOptions
    base_lr = 1.5e-4  # MAE: lr = 1.5e-4 * batch/256
    weight_decay = 0.05
    betas = (0.9, 0.95)
    options: MAEOptions

    def __init__(self, backbone: FoundationModel, options: MAEOptions, augment: Augmenter) -> None:
        super().__init__(backbone, options, augment)
        from timm.models.vision_transformer import Block

        vit = require_timm_vit(backbone, "mae")
        self.patch = patch_size(vit)
        self.size = int(backbone.preprocess.image_size[0])
        grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.in_chans = int(vit.patch_embed.proj.in_channels)
        d, dd = int(vit.embed_dim), options.decoder_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer(
            "decoder_pos", sincos_pos_embed(dd, grid).unsqueeze(0), persistent=False
        )
        self.decoder_blocks = nn.Sequential(
            *[
                Block(dd, options.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                for _ in range(options.decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch[0] * self.patch[1] * self.in_chans)
        self.augment_policy = augment.policy.geometric_only()  # MAE: crops and flips only

    def training_loss(
        self, images: torch.Tensor, gen: ImageDraws, step: int, total: int
    ) -> torch.Tensor:
        o = self.options
        x = self.augment.view(images, self.size, o.crop_scale, gen, policy=self.augment_policy)
        length = self.decoder_pos.shape[1]
        keep, restore, mask = random_masking(length, o.mask_ratio, gen)
        x, keep, restore, mask = (t.to(self.device) for t in (x, keep, restore, mask))
        vit = self.backbone.image_encoder
        tokens = vit_tokens(vit, x, keep)
        pred = self.decode(tokens, restore, vit.num_prefix_tokens)
        loss = masked_patch_loss(pred, patchify(x, self.patch), mask, o.norm_pix_loss)
        return share(loss, mask.sum())  # this process's part of the global batch's mean

    def decode(self, tokens: torch.Tensor, restore: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """Predicted pixels of every patch, (N, L, ph*pw*C), from the encoder's visible tokens."""
        y = self.decoder_embed(tokens)
        prefix, visible = y[:, :n_prefix], y[:, n_prefix:]
        n, length = restore.shape
        masked = self.mask_token.expand(n, length - visible.shape[1], -1)
        full = torch.cat([visible, masked], dim=1)
        full = torch.gather(full, 1, restore.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        full = full + self.decoder_pos
        y = self.decoder_blocks(torch.cat([prefix, full], dim=1))
        return self.decoder_pred(self.decoder_norm(y))[:, n_prefix:]
