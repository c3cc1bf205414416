"""Vision Transformer backbones (ViT-Ti/S/B/L, patch 16 or 8) as used by DINO / iBOT / DINOv2.

Parameters carry timm's names (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.norm1`,
`blocks.N.attn.qkv`, ..., `norm`), so exporting to the `vit_base_patch16_224` layout is a plain copy.
Two additions timm's classic ViT lacks: DINOv2-style register tokens (`reg_token`, inserted after the
CLS token and given no position embedding) and a learned `mask_token` that replaces masked patch
embeddings (iBOT's masked image modelling).

Initialisation follows DINO: trunc-normal(0.02) for Linear weights, `cls_token`, `reg_token` and
`pos_embed`, zero biases, LayerNorm (1, 0); the patch-embedding convolution keeps PyTorch's default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention

LAYER_NORM_EPS = 1e-6  # DINO and timm use 1e-6, not PyTorch's 1e-5


@dataclass(frozen=True)
class ViTArch:
    """Width / depth / heads of a named ViT size."""
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


ARCHITECTURES = {
    "vit_tiny": ViTArch(192, 12, 3),
    "vit_small": ViTArch(384, 12, 6),
    "vit_base": ViTArch(768, 12, 12),
    "vit_large": ViTArch(1024, 24, 16),
}


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Position embeddings [1, 1 + g_r*g_c, D] learned for a `grid` of patches -> [1, 1 + rows*cols, D]
    for a patch grid of `size` = (rows, cols): the CLS embedding is kept, the patch embeddings are
    resampled bicubically in fp32 (the result is added to every token) and returned in the input's dtype.
    The forward pass (every crop size) and `model.init_from` (weights learned at another resolution) share it.
    """
    (g_rows, g_cols), (rows, cols) = grid, size
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    D = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, g_rows, g_cols, D).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(rows, cols), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, D).to(cls_pos.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch for a random subset of samples (rows of dim 0).

    Kept samples are scaled by 1/keep so the expected output is unchanged; identity in eval mode.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> fc2 (timm names)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each drop-pathed."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 attn_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(x), this block's attention weights [B, H, L, L]), computed explicitly."""
        attn_out, weights = self.attn.forward_with_weights(self.norm1(x))
        x = x + self.drop_path(attn_out)
        return x + self.drop_path(self.mlp(self.norm2(x))), weights


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels, as one strided convolution (timm: `proj`)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, n, D], n in row-major patch order


class VisionTransformer(nn.Module):
    """ViT backbone returning the CLS token (and patch tokens) after the final LayerNorm.

    Inputs of any size divisible by the patch size are accepted: the position embeddings, learned for
    `img_size`, are bicubically interpolated to the crop's patch grid (DINO's
    `interpolate_pos_encoding`), which is how one backbone serves 224 px global and 96 px local crops.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, num_register_tokens: int = 0,
                 attn_backend: str = "sdpa"):
        super().__init__()
        if patch_size < 1 or img_size < patch_size or img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a positive multiple of patch_size ({patch_size})")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.attn_backend = attn_backend

        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Registers get no position embedding (DINOv2), so pos_embed covers CLS + patches only,
        # exactly the vit_base_patch16_224 layout.
        self.reg_token = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                          if num_register_tokens else None)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # zero init, as DINOv2
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        # (Python floats, not torch.linspace: the model may be built under a meta-device context.)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rates[i], attn_backend) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------
    # Tokens
    # ----------------------------------------------------------------------------------------------
    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of an input of that size; ValueError if not divisible."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input size {height}x{width} is not divisible by the patch size "
                             f"{self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def interpolate_pos_encoding(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings [1, 1 + rows*cols, D] for a rows x cols patch grid.

        The CLS embedding is kept; the patch embeddings are resampled bicubically (in fp32, since
        the result is added to every token) from the learned grid. Unlike DINO's `scale_factor`
        with the +0.1 offset, the target size is given exactly.
        """
        grid = self.patch_embed.grid_size
        if rows == grid and cols == grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, (grid, grid), (rows, cols))

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B,3,H,W] -> tokens [B, 1 + R + n, D]: CLS, registers, patches (+ position).

        `masks` [B, n] bool replaces those patch embeddings by `mask_token` before the position
        embedding is added, so a masked token still knows where it is (iBOT).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be [B, 3, H, W], got {tuple(x.shape)}")
        B, _, H, W = x.shape
        rows, cols = self.grid_shape(H, W)
        tokens = self.patch_embed(x)
        if masks is not None:
            if masks.shape != (B, rows * cols) or masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor of shape {(B, rows * cols)}, "
                                 f"got {masks.dtype} {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(rows, cols).to(tokens.dtype)
        if self.reg_token is not None:
            regs = self.reg_token.expand(B, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def _split(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens:]}
        if self.num_register_tokens:
            out["registers"] = tokens[:, 1:self.num_prefix_tokens]
        return out

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"cls": [B, D], "patch": [B, n, D]} (+ "registers" [B, R, D]) after the final norm."""
        tokens = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._split(self.norm(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS features [B, D]."""
        return self.forward_features(x)["cls"]

    def last_attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's self-attention weights [B, H, L, L] on images x [B,3,H,W] (DINO's
        `get_last_selfattention`); token order CLS, registers, patches (row-major), as `prepare_tokens`."""
        tokens = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        return self.blocks[-1].forward_with_attention(tokens)[1]

    # ----------------------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------------------
    def forward_flops(self, height: int, width: int | None = None) -> int:
        """Matmul FLOPs (2 per multiply-add) of one image's forward pass at height x width.

        Counts the patch-embedding convolution, qkv, Q K^T, attention x V, proj and the MLP; norms,
        GELU and softmax are ignored (standard for MFU). Per block with L tokens: 24 L D^2 + 4 L^2 D.
        """
        width = height if width is None else width
        rows, cols = self.grid_shape(height, width)
        n = rows * cols
        L = self.num_prefix_tokens + n
        D = self.embed_dim
        hidden = int(D * self.mlp_ratio)
        patch_embed = 2 * n * (3 * self.patch_size ** 2) * D
        block = 2 * L * D * 3 * D + 2 * 2 * L * L * D + 2 * L * D * D + 2 * 2 * L * D * hidden
        return patch_embed + self.depth * block


def build_backbone(name: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0,
                   num_register_tokens: int = 0, attn_backend: str = "sdpa",
                   depth: int | None = None) -> VisionTransformer:
    """A ViT by name: `vit_tiny` (192/12/3), `vit_small` (384/12/6), `vit_base` (768/12/12),
    `vit_large` (1024/24/16), as width/depth/heads; patch 16 or 8 (any divisor of img_size works).
    `depth` overrides the architecture's number of blocks (the CPU demo runs a 4-block ViT-Tiny).

    `attn_backend` is validated here: an unknown name is a ValueError and `xformers` without the
    package a RuntimeError, before any training starts.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"name must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    arch = ARCHITECTURES[name]
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive number of blocks (or None for {name}'s {arch.depth}), "
                         f"got {depth!r}")
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=arch.embed_dim,
                             depth=arch.depth if depth is None else depth, num_heads=arch.num_heads,
                             mlp_ratio=arch.mlp_ratio,
                             drop_path_rate=drop_path_rate, num_register_tokens=num_register_tokens,
                             attn_backend=attn_backend)
