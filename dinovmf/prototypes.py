"""Prototype health: the KoLeo-proto regulariser and the utilisation metrics (DESIGN §1).

Partial prototype collapse means many of the K prototypes end up (nearly) identical, so the effective
number of mixture components is far below K. `koleo_proto_loss` pushes every prototype away from its
nearest neighbour; `prototype_utilisation` counts distinct prototypes; `used_prototypes` counts the
prototypes that win at least one sample.

All pairwise work is chunked by rows so that K = 65536 never materialises a K x K matrix (16 GiB in
fp32); the chunk is sized to keep one [chunk, K] block around 256 MiB.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_BLOCK_ELEMENTS = 1 << 26  # elements of one [chunk, K] similarity block: 256 MiB in fp32
KOLEO_EPS = 1e-8  # as DINOv2's KoLeo: keeps log finite when two prototypes coincide exactly


def _check_weight(weight, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [K, p], got shape {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 prototypes (rows), got {weight.shape[0]}")


def _chunk_rows(k: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _BLOCK_ELEMENTS // k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return F.normalize(weight.to(acc), dim=1)


@torch.no_grad()
def nearest_neighbours(directions: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Index [K] of each unit row's nearest other row (largest cosine, i.e. smallest chord), chunked."""
    k = directions.shape[0]
    step = _chunk_rows(k, chunk_size)
    out = torch.empty(k, dtype=torch.long, device=directions.device)
    for i0 in range(0, k, step):
        i1 = min(k, i0 + step)
        sim = directions[i0:i1] @ directions.t()
        rows = torch.arange(i1 - i0, device=directions.device)
        sim[rows, rows + i0] = -math.inf  # a prototype is not its own neighbour
        out[i0:i1] = sim.argmax(dim=1)
    return out


def koleo_proto_loss(weight: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """KoLeo-proto: `-(1/K) sum_k log(min_{j != k} ||mu_k - mu_j|| + eps)` on mu = w / ||w||.

    The nearest neighbour is found without autograd, chunk by chunk; the loss is then a differentiable
    function of the K (prototype, neighbour) pairs only. That is the exact gradient of the min (a min
    is differentiated at its argmin) at O(K p) memory for autograd instead of O(K^2).
    """
    _check_weight(weight)
    mu = _unit_rows(weight)
    nn_idx = nearest_neighbours(mu.detach(), chunk_size)
    dist = torch.linalg.vector_norm(mu - mu[nn_idx], dim=1)
    return -torch.log(dist + KOLEO_EPS).mean()


@torch.no_grad()
def prototype_utilisation(weight: torch.Tensor, eps: float, chunk_size: int | None = None) -> int:
    """Number of unique prototypes: greedy merge of prototypes within cosine distance `eps`.

    Prototypes are visited in index order; an unassigned prototype becomes a new representative and
    claims every prototype within cosine distance `eps` (1 - cos <= eps) that is still unassigned.
    The count of representatives is returned. Chunked: each block of rows is compared with all K once;
    the sequential part (which rows of the block become representatives) runs on the host over the
    block's own [chunk, chunk] neighbourhood.
    """
    _check_weight(weight)
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < 2.0):
        raise ValueError(f"eps must be a cosine distance in [0, 2), got {eps!r}")
    mu = _unit_rows(weight)
    k = mu.shape[0]
    step = _chunk_rows(k, chunk_size)
    assigned = torch.zeros(k, dtype=torch.bool, device=mu.device)
    n_unique = 0
    for i0 in range(0, k, step):
        i1 = min(k, i0 + step)
        near = (1.0 - mu[i0:i1] @ mu.t()) <= eps  # [c, K]
        near_block = near[:, i0:i1].cpu().numpy()
        pending = (~assigned[i0:i1]).cpu().numpy()
        reps = []
        for i in range(i1 - i0):
            if pending[i]:
                reps.append(i)
                pending &= ~near_block[i]
        if reps:
            n_unique += len(reps)
            assigned |= near[torch.as_tensor(np.asarray(reps), device=mu.device)].any(dim=0)
    return n_unique


@torch.no_grad()
def used_prototypes(probs_or_logits: torch.Tensor) -> int:
    """Number of prototypes that are the argmax (last dim) of at least one row."""
    if not isinstance(probs_or_logits, torch.Tensor) or probs_or_logits.dim() < 1 or probs_or_logits.shape[-1] < 1:
        raise ValueError("probs_or_logits must be a tensor [..., K] with K >= 1")
    winners = probs_or_logits.reshape(-1, probs_or_logits.shape[-1]).argmax(dim=1)
    counts = torch.bincount(winners, minlength=probs_or_logits.shape[-1])
    return int((counts > 0).sum())
