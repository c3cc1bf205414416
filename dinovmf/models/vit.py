"""Vision Transformer backbones: ViT-Ti/S/B/L (patch 16, 14 or 8) as DINO / iBOT use them, and the options
of the DINOv2 / DINOv3 backbones (named presets in `dinovmf.architectures`).

Parameters carry timm's names (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.norm1`,
`blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, ..., `norm`), so exporting a classic ViT to the
`vit_base_patch16_224` layout is a plain copy. Additions to timm's classic ViT:
- register tokens (`reg_token`; DINOv2's registers, DINOv3's storage tokens: one concept), inserted after the
  CLS token and given no position embedding;
- a learned `mask_token` that replaces masked patch embeddings (iBOT's masked image modelling);
- LayerScale (`layerscale_init`: `blocks.N.ls1.gamma`, `ls2.gamma`, as DINOv2 and timm);
- a SwiGLU FFN (`ffn="swiglu"`: DINOv2's `SwiGLUFFNFused` sizing, packed `mlp.fc1` = DINOv2's `w12`);
- DINOv3's 2-D RoPE (`pos_encoding="rope"`: no `pos_embed`; q and k of the patch tokens rotated in every
  block, `dinovmf/models/rope.py`), with the key bias masked when `qkv_bias` (see `Attention`);
- `qkv_bias` on/off, the LayerNorm epsilon (DINOv3: 1e-5) and how learned position embeddings are resampled
  to other crop sizes (`pos_embed_resample`: exact, antialiased as DINOv2's presets and timm, or DINO's +0.1
  offset).

Initialisation follows DINO: trunc-normal(0.02) for Linear weights, `cls_token`, `reg_token` and
`pos_embed`, zero biases, LayerNorm (1, 0), LayerScale at its init value; the patch-embedding convolution
keeps PyTorch's default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinovmf.architectures import (ARCHITECTURES, FFN_KINDS, LAYER_NORM_EPS, POS_ENCODINGS, POS_RESAMPLINGS,
                                   ViTArch, resolve_arch, swiglu_hidden_dim)

from .attention import Attention
from .rope import RotaryEmbedding2d

__all__ = ["ARCHITECTURES", "LAYER_NORM_EPS", "ViTArch", "VisionTransformer", "build_backbone", "resize_pos_embed"]
# With no explicit img_size and no preset grid: the size the learned position embeddings are built for.
DEFAULT_IMG_SIZE = 224


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                     resample: str = "exact") -> torch.Tensor:
    """Position embeddings [1, 1 + g_r*g_c, D] learned for a `grid` of patches -> [1, 1 + rows*cols, D]
    for a patch grid of `size` = (rows, cols): the CLS embedding is kept, the patch embeddings are
    resampled bicubically in fp32 (the result is added to every token) and returned in the input's dtype.
    `resample` (`POS_RESAMPLINGS`): `exact` to the target size; `antialias` the same with antialiasing
    (timm, DINOv2's register models); `offset` with a scale factor of (n + 0.1) / grid per axis and no
    antialiasing, as the original DINO and DINOv2's models without registers (the output size is still n,
    but the source positions sampled move by up to 0.1 patch: the kludge their weights were trained with).
    The forward pass (every crop size) and `model.init_from` (weights learned at another resolution) share it.
    """
    if resample not in POS_RESAMPLINGS:
        raise ValueError(f"resample must be one of {POS_RESAMPLINGS}, got {resample!r}")
    (g_rows, g_cols), (rows, cols) = grid, size
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    D = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, g_rows, g_cols, D).permute(0, 3, 1, 2).float()
    if resample == "offset":
        target = {"scale_factor": ((rows + 0.1) / g_rows, (cols + 0.1) / g_cols)}
    else:
        target = {"size": (rows, cols)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False, antialias=resample == "antialias",
                              **target)
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


class SwiGLU(nn.Module):
    """SwiGLU feed-forward with DINOv2's fused sizing (`swiglu_hidden_dim`): fc1 -> [a, b], fc2(silu(a) * b).

    `fc1` packs DINOv2's `w12` (gate rows first) and `fc2` is its `w3`: timm's `SwiGLUPacked` names.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        hidden = swiglu_hidden_dim(hidden_dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class LayerScale(nn.Module):
    """x * gamma, gamma [D] starting at `init` (DINOv2 / CaiT; parameter name as DINOv2 and timm)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"init={self.init}"


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each drop-pathed;
    ls1 / ls2 are LayerScale with `layerscale_init`, else identities."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 attn_backend: str, *, layerscale_init: float | None = None, ffn: str = "mlp",
                 qkv_bias: bool = True, mask_k_bias: bool = False, layer_norm_eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, hidden) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def forward_with_attention(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(x), this block's attention weights [B, H, L, L]), computed explicitly."""
        attn_out, weights = self.attn.forward_with_weights(self.norm1(x), rope)
        x = x + self.drop_path(self.ls1(attn_out))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x)))), weights


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

    Inputs of any size divisible by the patch size are accepted. Learned position embeddings, made for
    `img_size`, are bicubically interpolated to the crop's patch grid (DINO's `interpolate_pos_encoding`);
    RoPE needs no interpolation (its coordinates are normalised per axis). Either way one backbone serves
    224 px global and 96 px local crops.
    """

    def __init__(self, img_size: int = DEFAULT_IMG_SIZE, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, num_register_tokens: int = 0,
                 attn_backend: str = "sdpa", *, layerscale_init: float | None = None, ffn: str = "mlp",
                 pos_encoding: str = "learned", qkv_bias: bool = True,
                 layer_norm_eps: float = LAYER_NORM_EPS, pos_embed_resample: str = "exact"):
        super().__init__()
        if patch_size < 1 or img_size < patch_size or img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a positive multiple of patch_size ({patch_size})")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {ffn!r}")
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {pos_encoding!r}")
        if pos_embed_resample not in POS_RESAMPLINGS:
            raise ValueError(f"pos_embed_resample must be one of {POS_RESAMPLINGS}, got {pos_embed_resample!r}")
        if layerscale_init is not None and not layerscale_init > 0:
            raise ValueError(f"layerscale_init must be > 0 (or None: no layer scale), got {layerscale_init}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.attn_backend = attn_backend
        self.layerscale_init = layerscale_init or None
        self.ffn = ffn
        self.pos_encoding = pos_encoding
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.pos_embed_resample = pos_embed_resample

        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Registers get no position embedding (DINOv2), so pos_embed covers CLS + patches only,
        # exactly the vit_base_patch16_224 layout.
        self.reg_token = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                          if num_register_tokens else None)
        rope = pos_encoding == "rope"
        self.pos_embed = (None if rope else
                          nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim)))
        self.rope = RotaryEmbedding2d(embed_dim // num_heads) if rope else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # zero init, as DINOv2
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        # (Python floats, not torch.linspace: the model may be built under a meta-device context.)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rates[i], attn_backend, layerscale_init=self.layerscale_init,
                  ffn=ffn, qkv_bias=qkv_bias, mask_k_bias=rope, layer_norm_eps=layer_norm_eps)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed is not None:
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

    def init_buffers(self) -> None:
        """Recompute the buffers that are not learned (RoPE periods) after `to_empty`, which leaves them unset."""
        if self.rope is not None:
            self.rope.reset_periods()

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
        the result is added to every token) from the learned grid, as `pos_embed_resample` says.
        """
        grid = self.patch_embed.grid_size
        if rows == grid and cols == grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, (grid, grid), (rows, cols), self.pos_embed_resample)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B,3,H,W] -> tokens [B, 1 + R + n, D]: CLS, registers, patches (+ learned position).

        `masks` [B, n] bool replaces those patch embeddings by `mask_token` before the position
        embedding is added (or RoPE rotates them in attention), so a masked token still knows where it
        is (iBOT).
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
        if self.pos_embed is not None:
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
    def block_ropes(self, height: int, width: int) -> list:
        """Per block, the RoPE (sin, cos) tables of an input of height x width (None without RoPE). In eval
        mode every block shares one pair; in training each draws its own coordinate rescale, as DINOv3."""
        if self.rope is None:
            return [None] * len(self.blocks)
        rows, cols = self.grid_shape(height, width)
        if self.training and self.rope.rescale is not None:
            return [self.rope.tables(rows, cols, self.num_prefix_tokens) for _ in self.blocks]
        return [self.rope.tables(rows, cols, self.num_prefix_tokens)] * len(self.blocks)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"cls": [B, D], "patch": [B, n, D]} (+ "registers" [B, R, D]) after the final norm."""
        tokens = self.prepare_tokens(x, masks)
        for block, rope in zip(self.blocks, self.block_ropes(*x.shape[-2:])):
            tokens = block(tokens, rope)
        return self._split(self.norm(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS features [B, D]."""
        return self.forward_features(x)["cls"]

    def last_attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's self-attention weights [B, H, L, L] on images x [B,3,H,W] (DINO's
        `get_last_selfattention`); token order CLS, registers, patches (row-major), as `prepare_tokens`."""
        tokens = self.prepare_tokens(x)
        ropes = self.block_ropes(*x.shape[-2:])
        for block, rope in zip(self.blocks[:-1], ropes):
            tokens = block(tokens, rope)
        return self.blocks[-1].forward_with_attention(tokens, ropes[-1])[1]

    # ----------------------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------------------
    def forward_flops(self, height: int, width: int | None = None) -> int:
        """Matmul FLOPs (2 per multiply-add) of one image's forward pass at height x width.

        Counts the patch-embedding convolution, qkv, Q K^T, attention x V, proj and the FFN; norms,
        GELU / SiLU, softmax, RoPE and layer scale are ignored (standard for MFU). Per block with L tokens
        and the MLP: 24 L D^2 + 4 L^2 D; a SwiGLU FFN of hidden width h costs 6 L D h instead of 16 L D^2.
        """
        width = height if width is None else width
        rows, cols = self.grid_shape(height, width)
        n = rows * cols
        L = self.num_prefix_tokens + n
        D = self.embed_dim
        hidden = int(D * self.mlp_ratio)
        if self.ffn == "swiglu":
            h = swiglu_hidden_dim(hidden)
            ffn = 2 * L * D * 2 * h + 2 * L * h * D
        else:
            ffn = 2 * 2 * L * D * hidden
        patch_embed = 2 * n * (3 * self.patch_size ** 2) * D
        block = 2 * L * D * 3 * D + 2 * 2 * L * L * D + 2 * L * D * D + ffn
        return patch_embed + self.depth * block


def build_backbone(name: str, patch_size: int | None = None, img_size: int | None = None,
                   drop_path_rate: float = 0.0, num_register_tokens: int | None = None, attn_backend: str = "sdpa",
                   depth: int | None = None, layerscale_init: float | None = None, ffn: str | None = None,
                   pos_encoding: str | None = None, qkv_bias: bool | None = None,
                   pos_embed_resample: str | None = None) -> VisionTransformer:
    """A ViT by name: a size, `vit_tiny` (192/12/3), `vit_small` (384/12/6), `vit_base` (768/12/12),
    `vit_large` (1024/24/16), `vit_giant2` (1536/40/24) as width/depth/heads with the classic options (patch
    16, learned positions, MLP, no layer scale), or a preset of `dinovmf.architectures.BACKBONE_PRESETS`
    (`dinov2_vits14`, `dinov2_vitb14_reg4`, `dinov2_vitg14`, `dinov3_vitl16`, ...). Options left at None take
    the architecture's value; `img_size` (the learned position grid) falls back to 224. `depth` overrides the
    number of blocks (the CPU demo runs a 4-block ViT-Tiny); `layerscale_init=0` turns a preset's layer scale
    off.

    `attn_backend` is validated here: an unknown name is a ValueError and `xformers` without the
    package a RuntimeError, before any training starts.
    """
    arch, options = resolve_arch(name, patch_size=patch_size, img_size=img_size,
                                 num_register_tokens=num_register_tokens, layerscale_init=layerscale_init,
                                 ffn=ffn, pos_encoding=pos_encoding, qkv_bias=qkv_bias,
                                 pos_embed_resample=pos_embed_resample)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive number of blocks (or None for {name}'s {arch.depth}), "
                         f"got {depth!r}")
    return VisionTransformer(img_size=options.img_size or DEFAULT_IMG_SIZE, patch_size=options.patch_size,
                             embed_dim=arch.embed_dim, depth=arch.depth if depth is None else depth,
                             num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, drop_path_rate=drop_path_rate,
                             num_register_tokens=options.num_register_tokens, attn_backend=attn_backend,
                             layerscale_init=options.layerscale_init, ffn=options.ffn,
                             pos_encoding=options.pos_encoding, qkv_bias=options.qkv_bias,
                             layer_norm_eps=options.layer_norm_eps, pos_embed_resample=options.pos_embed_resample)
