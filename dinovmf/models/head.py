"""The DINO / DINO-vMF projection head: MLP -> unit bottleneck z, plus weight-normalised prototypes.

DINO's head ends in `weight_norm(Linear(p, K))`, i.e. prototypes `w_k = g_k v_k / ||v_k||`. Here `v`
[K, p] and `g` [K] are plain parameters and `prototypes()` forms `W` explicitly (the `weight_norm`
hook is deprecated and hides the parametrisation the vMF loss needs):
- `norm_last_layer=True` (DINO): `g` is fixed at 1 (requires_grad False), every ||w_k|| = 1.
- `norm_last_layer=False` (DINO-vMF): `g` trains, so ||w_k|| = |g_k| sets the vMF concentration
  kappa_k = ||w_k|| / tau.

`forward` stops at z: the logits z @ W^T / tau (+ the vMF normaliser) are formed inside the loss,
whose fused kernels never materialise the [N, K] matrix in the forward pass of the head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    """DINO's head MLP: nlayers Linear layers (in -> hidden ... -> bottleneck), GELU between, Linear
    weights trunc-normal(0.02) and zero biases."""
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    layers: list[nn.Module] = []
    for i in range(nlayers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < nlayers - 1:
            layers.append(nn.GELU())
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def effective_prototypes(prototypes) -> torch.Tensor:
    """W [K, p] from W itself or from weight-norm parameters (v, g): W = g v / ||v|| (differentiable). The one
    definition of the prototypes' weight-norm form (the head, the loss references, KoLeo-proto)."""
    if isinstance(prototypes, torch.Tensor):
        return prototypes
    v, g = prototypes
    return F.normalize(v, dim=1) * g.unsqueeze(1)


class DINOHead(nn.Module):
    """MLP (nlayers Linear layers, GELU between, hidden_dim wide) -> bottleneck_dim -> L2 normalise.

    Prototypes: `v` [out_dim, bottleneck_dim], `g` [out_dim]; see the module docstring.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        for arg, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                           ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if int(value) < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.hidden_dim, self.bottleneck_dim, self.nlayers = hidden_dim, bottleneck_dim, nlayers
        self.norm_last_layer = norm_last_layer

        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)

        # v: nn.Linear's default init (uniform +-1/sqrt(fan_in)), as DINO's weight-normed Linear.
        bound = 1.0 / math.sqrt(bottleneck_dim)
        self.v = nn.Parameter(torch.empty(out_dim, bottleneck_dim).uniform_(-bound, bound))
        self.g = nn.Parameter(torch.ones(out_dim), requires_grad=not norm_last_layer)

    @torch.no_grad()
    def spread_norms_(self, sigma: float) -> None:
        """Draw the prototype norms log-normally around 1: g_k = exp(sigma * eps_k), eps_k ~ N(0, 1) from
        torch's global RNG (median 1, std of log g = sigma); sigma = 0 leaves g = 1 and draws nothing.

        Spread norms give the prototypes different vMF precisions kappa_k = g_k / tau from the start (the
        regime where the vMF normaliser can act); only free norms (norm_last_layer=False) can hold them.
        """
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite float >= 0, got {sigma!r}")
        if sigma == 0:
            return
        if self.norm_last_layer:
            raise ValueError("spread_norms_ needs free prototype norms (norm_last_layer=False): "
                             "with norm_last_layer=True every ||w_k|| is fixed at 1")
        self.g.copy_(torch.exp(sigma * torch.randn(self.out_dim, dtype=self.g.dtype, device=self.g.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_dim] -> z [..., bottleneck_dim] with unit L2 norm per row."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x must end in in_dim={self.in_dim}, got shape {tuple(x.shape)}")
        return F.normalize(self.mlp(x), dim=-1)

    def prototypes(self) -> torch.Tensor:
        """Effective prototype matrix W = g * v / ||v|| [out_dim, bottleneck_dim], differentiable."""
        return effective_prototypes((self.v, self.g))

    def prototype_parameters(self) -> list[nn.Parameter]:
        """The last-layer parameters (v, g): the ones DINO freezes during the first epoch."""
        return [self.v, self.g]

    def flops(self, rows: int) -> int:
        """Matmul FLOPs of `forward` on `rows` inputs (the MLP; the logits belong to the loss)."""
        dims = [self.in_dim] + [self.hidden_dim] * (self.nlayers - 1) + [self.bottleneck_dim]
        return 2 * rows * sum(a * b for a, b in zip(dims[:-1], dims[1:]))

    def extra_repr(self) -> str:
        return (f"prototypes={self.out_dim}x{self.bottleneck_dim}, "
                f"norm_last_layer={self.norm_last_layer}")
