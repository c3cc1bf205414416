"""DINOv3's 2-D axial rotary position embedding (RoPE) of a ViT's patch tokens.

Per attention head of dimension d, the rotation frequencies come in two halves of d/4: the first rotate by
the patch's row coordinate, the second by its column coordinate (axial: the two never mix), with periods
`p_j = base^(2j / (d/2))`, j < d/4, base 100. Coordinates are patch centres normalised per axis to [-1, 1],
`c_i = 2 (i + 0.5) / n - 1` for row (or column) i of n ("separate" normalisation), so every grid, 224 px or
96 px crops alike, spans the same field at another density: nothing is interpolated, unlike learned position
embeddings. In training DINOv3 multiplies the coordinates by a log-uniform factor in [1/rescale, rescale]
(rescale 2), one draw per block and call; in eval mode (the teacher, evaluation) they are used as they are.

A dimension i < d/2 pairs with i + d/2 ("rotate half", as DINOv3 and timm): angle `t = 2 pi c / p`,
`q' = q cos t + rotate_half(q) sin t` with `rotate_half([a, b]) = [-b, a]`, the same for k, in float32 (as
DINOv3) and cast back. The prefix tokens (CLS, registers) are not rotated: their rows of the tables are
cos 1, sin 0, so one elementwise pass over all tokens leaves them exactly as they are.

`periods` is a persistent buffer like DINOv3's `rope_embed.periods`: the released DINOv3 weights hold their
periods rounded to bfloat16, and loading those reproduces the released models exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ROPE_BASE = 100.0     # DINOv3's pos_embed_rope_base
ROPE_RESCALE = 2.0    # DINOv3's pos_embed_rope_rescale_coords (training only)


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The d/4 periods `base^(2j / (d/2))` [head_dim // 4], float32, computed as DINOv3 and timm do."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """q or k [B, L, H, d] rotated by tables [L, d], in float32 at least (as DINOv3), returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


class RotaryEmbedding2d(nn.Module):
    """The sin / cos tables of DINOv3's RoPE for a grid of patches (module docstring)."""

    def __init__(self, head_dim: int, base: float = ROPE_BASE, rescale: float | None = ROPE_RESCALE):
        super().__init__()
        if rescale is not None and rescale < 1:
            raise ValueError(f"rescale must be >= 1 (or None), got {rescale}")
        self.head_dim, self.base, self.rescale = head_dim, base, rescale
        self.register_buffer("periods", rope_periods(head_dim, base), persistent=True)

    def reset_periods(self) -> None:
        """Recompute `periods` (after `to_empty`, which leaves buffers unset)."""
        with torch.no_grad():
            self.periods.copy_(rope_periods(self.head_dim, self.base))

    def coordinates(self, rows: int, cols: int) -> torch.Tensor:
        """[rows * cols, 2] (row, column) patch-centre coordinates in [-1, 1], row-major, in float32 (float64 in a
        float64 model, whose `periods` are float64)."""
        device, dtype = self.periods.device, torch.promote_types(self.periods.dtype, torch.float32)
        r = torch.arange(0.5, rows, device=device, dtype=dtype) / rows
        c = torch.arange(0.5, cols, device=device, dtype=dtype) / cols
        coords = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).flatten(0, 1)
        return 2.0 * coords - 1.0

    def tables(self, rows: int, cols: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos) [prefix + rows * cols, head_dim] float32 for a rows x cols grid after `prefix`
        unrotated tokens; in training mode the coordinates are rescaled by a fresh log-uniform draw."""
        coords = self.coordinates(rows, cols)
        if self.training and self.rescale is not None:
            bound = math.log(self.rescale)
            coords = coords * torch.empty(1, device=coords.device, dtype=coords.dtype).uniform_(-bound, bound).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(coords.dtype)[None, None, :]  # [n, 2, d/4]
        angles = angles.flatten(1, 2).tile(2)                                          # [n, d]
        sin, cos = angles.sin(), angles.cos()
        if prefix:
            sin = torch.cat((sin.new_zeros(prefix, self.head_dim), sin))
            cos = torch.cat((cos.new_ones(prefix, self.head_dim), cos))
        return sin, cos

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, rescale={self.rescale}"
