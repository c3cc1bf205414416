"""Multi-head self-attention with pluggable kernels.

Backends (chosen per model by `attn_backend`):
- `sdpa`     `torch.nn.functional.scaled_dot_product_attention` (default; flash / memory-efficient
             kernels on GPU, a fused CPU kernel here).
- `xformers` `xformers.ops.memory_efficient_attention`; only when xformers imports, and the error
             is raised when the model is built, not in the middle of the first training step.
- `math`     softmax(Q K^T / sqrt(d)) V written out: the reference the others are tested against.

Every kernel takes q, k, v as [B, L, H, d] (xformers' "BMHK" layout, which is what the fused qkv
projection yields without a copy) and returns [B, L, H, d].
"""
from __future__ import annotations

import importlib
import math
from functools import lru_cache
import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


@lru_cache(maxsize=1)
def _xformers_ops():
    """`xformers.ops`, or None when xformers is not installed (or fails to import)."""
    try:
        return importlib.import_module("xformers.ops")
    except Exception:  # noqa: BLE001 - a broken install (CUDA mismatch...) counts as unavailable
        return None


def xformers_available() -> bool:
    """True when `xformers.ops.memory_efficient_attention` can be imported."""
    return _xformers_ops() is not None


def check_attention_backend(name: str) -> str:
    """Validate an attention backend name; raises at model-build time rather than at first use.

    ValueError for an unknown name, RuntimeError when `xformers` is asked for but cannot be imported.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "xformers" and not xformers_available():
        raise RuntimeError("attn_backend='xformers' needs the xformers package, which cannot be "
                           "imported here; use attn_backend='sdpa' (default) or install xformers")
    return name


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) [B, H, L, L] (rows: queries) of q/k [B, L, H, d], mask [L, L] bool or None."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.transpose(1, 2) * scale) @ k.permute(0, 2, 3, 1)  # [B, H, L, d] @ [B, H, d, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference attention: softmax(q k^T / sqrt(d)) v, q/k/v [B, L, H, d], mask [L, L] bool or None."""
    return (attention_weights(q, k, mask) @ v.transpose(1, 2)).transpose(1, 2)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused scaled_dot_product_attention; q/k/v [B, L, H, d], mask [L, L] bool or None."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers memory_efficient_attention on q/k/v [B, L, H, d] (its native layout)."""
    return _xformers_ops().memory_efficient_attention(q, k, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Dispatch q/k/v [B, L, H, d] to `backend`."""
    if backend == "xformers":
        return xformers_attention(q, k, v)
    if backend == "sdpa":
        return sdpa_attention(q, k, v)
    if backend == "math":
        return math_attention(q, k, v)
    raise ValueError(f"attn_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (`qkv`, `proj`).

    `mask_k_bias` (with `qkv_bias`): the key bias is fixed at zero, as DINOv3's `LinearKMaskedBias` and
    timm's Eva: `qkv` has no bias of its own and the query and value biases are the parameters `q_bias`,
    `v_bias` (timm's names). Without rotation a key bias cancels in the softmax (it adds the same q . b to
    every score of a row); under RoPE it is rotated per position and would not, so RoPE models mask it.
    `rope` in forward: (sin, cos) tables [L, head_dim] (`dinovmf.models.rope`) that rotate q and k.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa",
                 mask_k_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = check_attention_backend(backend)
        separate = qkv_bias and mask_k_bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and not separate)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if separate else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if separate else None
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, L, 3, self.num_heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)
        out = attend(q, k, v, self.backend)
        return self.proj(out.reshape(x.shape))

    def forward_with_weights(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(x), attention weights [B, H, L, L]), the weights computed explicitly from the same
        q and k the kernels get (SDPA / xformers never return them); for visualisation, not training."""
        q, k, v = self._qkv(x, rope)
        weights = attention_weights(q, k)
        out = (weights @ v.transpose(1, 2)).transpose(1, 2)
        return self.proj(out.reshape(x.shape)), weights
