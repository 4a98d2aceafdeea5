"""Primus (Wald et al., 2025, "Primus: Enforcing Attention Usage for 3D Medical Image
Segmentation"), the transformer of the OpenMind benchmark, written against the paper and the
authors' configuration (dynamic-network-architectures' ``Primus``/``PrimusS..L``).

Not imported from that library: its Primus calls timm's ``RotaryEmbeddingCat`` in a way that
timm 1.0.23 changed (clinadapt pins timm 1.0.31), so the 3D rotary embedding is computed here
exactly as timm 1.0.22 did (``build_rotary_pos_embed`` in language-model frequency mode, grid
= token indices), and the transformer blocks are timm's own ``EvaBlock``; a test checks the
whole network against outputs the library computed with timm 1.0.22.

Patch embedding: a Conv3d with kernel = stride = patch (8^3). EVA encoder: absolute position
embedding plus 3D RoPE on a rotary width of head_dim / 1.5 (a third per axis), SwiGLU MLPs
(ratio 8/3) with a norm inside, a LayerNorm inside attention, layer scale 0.1 and
LayerNorm(eps 1e-5) throughout. Decoder: transposed convolutions of stride 2 (LayerNorm over
channels + GELU between them) from the token grid back to the voxels. Tokens are ordered x, y,
z (row-major over the grid), as the 0.4.3 release fixed it. Published sizes (``_PRIMUS_CONFIGS``):
S 396-d, 12 blocks, 6 heads; B 792-d, 12 blocks, 12 heads; M 864-d, 16 blocks, 12 heads;
L 1056-d, 24 blocks, 16 heads. For classification the features are the mean of the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.models.volume.base import MappedCheckpoint, VolumeArch, he_init


@dataclass(frozen=True)
class PrimusConfig:
    embed_dim: int = 864
    depth: int = 16
    num_heads: int = 12
    patch: int = 8
    input_size: tuple[int, int, int] = (160, 160, 160)
    mlp_ratio: float = 4 * 2 / 3
    init_values: float | None = 0.1
    scale_attn_inner: bool = True
    drop_path_rate: float = 0.0
    num_register_tokens: int = 0
    in_chans: int = 1

    def __post_init__(self) -> None:
        head = self.embed_dim / self.num_heads
        rope = head / 1.5
        if rope != int(rope) or int(rope) % 4:
            raise IncompatibleError(
                f"primus: embed_dim / num_heads / 1.5 must be a multiple of 4 (the 3D rotary "
                f"width), got {self.embed_dim} / {self.num_heads} / 1.5 = {rope:g}"
            )
        if any(s % self.patch for s in self.input_size):
            raise IncompatibleError(
                f"primus: input_size {self.input_size} must be a multiple of the patch {self.patch}"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // self.patch for s in self.input_size)  # type: ignore[return-value]


def rope_3d(grid: Sequence[int], rope_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The concatenated (sin, cos) rotary embedding of a 3D token grid, (N, 2 * 1.5 * rope_dim).

    As timm 1.0.22's ``RotaryEmbeddingCat(rope_dim, in_pixels=False, feat_shape=grid,
    ref_feat_shape=grid)``: rope_dim // 4 frequencies 1 / temperature^(k / (rope_dim // 4)) per
    axis, token indices as positions, each angle repeated twice (interleaved pairs).
    """
    n = rope_dim // 4
    bands = 1.0 / temperature ** (torch.arange(n, dtype=torch.float32) / n)
    axes = [torch.arange(s, dtype=torch.float32) for s in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(-1) * bands
    count = math.prod(grid)
    sin = pos.sin().reshape(count, -1).repeat_interleave(2, -1)
    cos = pos.cos().reshape(count, -1).repeat_interleave(2, -1)
    return torch.cat([sin, cos], -1)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, cin: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(cin, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Eva(nn.Module):
    """EVA encoder on token sequences: position embeddings, RoPE, timm EvaBlocks, final norm."""

    def __init__(self, cfg: PrimusConfig) -> None:
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.eva import EvaBlock

        d = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_register_tokens
        self.pos_embed = nn.Parameter(
            torch.zeros(1, math.prod(cfg.grid) + self.num_prefix_tokens, d)
        )
        rope_dim = round(d // cfg.num_heads / 1.5)
        self.register_buffer("rope", rope_3d(cfg.grid, rope_dim), persistent=False)
        dpr = np.linspace(0, cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            EvaBlock(
                dim=d,
                num_heads=cfg.num_heads,
                qkv_bias=True,
                qkv_fused=False,
                mlp_ratio=cfg.mlp_ratio,
                swiglu_mlp=True,
                scale_mlp=True,
                scale_attn_inner=cfg.scale_attn_inner,
                drop_path=float(dpr[i]),
                norm_layer=nn.LayerNorm,
                init_values=cfg.init_values,
                num_prefix_tokens=self.num_prefix_tokens,
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d)
        for m in self.modules():  # the authors' init: truncated normal linears, zero biases
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        with torch.no_grad():  # and residual projections scaled by 1/sqrt(2 * layer)
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x, rope=self.rope)
        return self.norm(x)


class PrimusEncoder(nn.Module):
    """Patch embedding + EVA; returns the token grid as a (N, D, gx, gy, gz) feature map."""

    def __init__(self, cfg: PrimusConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.down_projection = PatchEmbed(cfg.patch, cfg.in_chans, cfg.embed_dim)
        self.eva = Eva(cfg)
        self.register_buffer("mask_token", torch.zeros(1, 1, cfg.embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.embed_dim))
            if cfg.num_register_tokens
            else None
        )
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        he_init(self.down_projection)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(N, L, D) tokens after the encoder, and the grid they came from."""
        if tuple(x.shape[2:]) != tuple(self.cfg.input_size):
            raise IncompatibleError(
                f"primus takes volumes of {self.cfg.input_size} (its position embedding is for "
                f"that grid), got {tuple(x.shape[2:])}"
            )
        y = self.down_projection(x)
        grid = tuple(y.shape[2:])
        y = y.flatten(2).transpose(1, 2)  # tokens in x, y, z row-major order
        if self.register_tokens is not None:
            y = torch.cat((self.register_tokens.expand(y.shape[0], -1, -1), y), dim=1)
        y = self.eva(y)
        return y[:, self.eva.num_prefix_tokens :], grid

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y, grid = self.tokens(x)
        return [y.transpose(1, 2).reshape(y.shape[0], -1, *grid)]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (N, C, ...) map (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return self.weight.view(shape) * x + self.bias.view(shape)


class PatchDecode(nn.Module):
    """log2(patch) transposed convolutions of stride 2 from the embedding width down to the
    classes; the widths shrink geometrically, rounded to multiples of 8 (the authors' rule)."""

    def __init__(self, patch: int, dim: int, out_channels: int) -> None:
        super().__init__()
        stages_n = round(math.log2(patch))
        reduce = (dim / (2 * out_channels)) ** (1 / stages_n)

        def round8(v: float) -> int:
            return int(max(8, np.round((v + 1e-6) / 8) * 8))

        ch = [dim] + [round8(dim / reduce ** (i + 1)) for i in range(stages_n)]
        ch[-1] = out_channels
        stages: list[nn.Module] = [
            nn.Sequential(
                nn.ConvTranspose3d(ch[s], ch[s + 1], 2, stride=2),
                ChannelLayerNorm(ch[s + 1]),
                nn.GELU(),
            )
            for s in range(stages_n - 1)
        ]
        stages.append(nn.ConvTranspose3d(ch[-2], ch[-1], 2, stride=2))
        self.decode = nn.Sequential(*stages)
        he_init(self)

    def forward(self, feats: Sequence[torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(feats[-1])


class Primus(VolumeArch):
    def __init__(self, cfg: PrimusConfig) -> None:
        super().__init__(PrimusEncoder(cfg), cfg.embed_dim)
        self.cfg = cfg
        self.divisor = cfg.patch

    def pool(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return feats[-1].flatten(2).mean(2)  # the mean token

    def make_decoder(self, out_channels: int) -> nn.Module:
        return PatchDecode(self.cfg.patch, self.cfg.embed_dim, out_channels)

    def map_checkpoint(self, state: Mapping[str, torch.Tensor]) -> MappedCheckpoint:
        """The authors' names: ``down_projection``, ``eva``, ``mask_token``,
        ``register_tokens`` (encoder) and ``up_projection`` (decoder)."""
        out = MappedCheckpoint({}, {}, [])
        for k, v in state.items():
            head = k.split(".", 1)[0]
            if head in ("down_projection", "eva", "mask_token", "register_tokens"):
                if k == "eva.rope.pos_embed" or k.startswith("eva.rope."):
                    out.ignored.append(k)  # recomputed from the grid
                else:
                    out.encoder[k] = v
            elif head == "up_projection":
                out.decoder[k.split(".", 1)[1]] = v
            else:
                out.ignored.append(k)
        return out

    def config(self) -> dict[str, Any]:
        return {"arch": "primus", **self.cfg.__dict__}
