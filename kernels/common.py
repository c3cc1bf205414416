"""Host-side pieces shared by every fused backend (Triton, C++, CUDA): input checks, the DINO pairing
counts, the Debye constants of the vMF column bias, and the Sinkhorn-Knopp driver.

Nothing here imports triton or a compiled extension, so the C++ backend works without either.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

CENTERING_MODES = ("logit", "prob", "none", "sinkhorn")
SINKHORN_ITERATIONS = 3  # DINOv2's default; the contract fixes it.
# Below this bottleneck size the Debye expansion is not accurate enough in fp32 (DESIGN.md §1: the
# truncation error is 2e-7 at nu = 7), so the column bias is precomputed with dinovmf.vmf instead.
MIN_P_IN_KERNEL_BIAS = 32


def pair_count(S: int, T: int) -> int:
    """Number of DINO (teacher t, student s) pairs: t < T, s < S, s != t."""
    return T * S - min(S, T)


def check_ce_inputs(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> None:
    """Validate `dino_cross_entropy` inputs (every backend and the reference share this); raise
    ValueError naming the offending argument."""
    for name, x in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D [views, B, K], got shape {tuple(x.shape)}")
    S, B, K = student_logits.shape
    T = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (B, K):
        raise ValueError(f"teacher_probs shape {tuple(teacher_probs.shape)} does not match student_logits "
                         f"[S={S}, B={B}, K={K}] in B and K")
    if T < 1 or B < 1 or K < 1:
        raise ValueError(f"empty input: student_logits {tuple(student_logits.shape)}, "
                         f"teacher_probs {tuple(teacher_probs.shape)}")
    if T > S:
        raise ValueError(f"teacher_probs needs 1 <= T <= S={S} views, got T={T}")
    if S < 2:
        raise ValueError(f"no DINO pairs: student_logits needs S >= 2 views (a view is never paired with "
                         f"itself), got S={S}")
    if student_logits.device != teacher_probs.device:
        raise ValueError(f"student_logits is on {student_logits.device}, teacher_probs on {teacher_probs.device}")


def check_teacher_inputs(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None,
                         weight_norm: torch.Tensor | None, p: int | None) -> None:
    """Validate `teacher_distribution` inputs; raise ValueError naming the offending argument."""
    if dots.dim() != 2 or dots.shape[0] < 1 or dots.shape[1] < 1:
        raise ValueError(f"dots must be a non-empty [N, K] tensor, got shape {tuple(dots.shape)}")
    if not dots.is_floating_point():
        raise ValueError(f"dots must be a floating-point tensor, got {dots.dtype}")
    if not (isinstance(temp, (int, float)) and math.isfinite(temp) and temp > 0):
        raise ValueError(f"temp must be a positive finite float, got {temp!r}")
    if mode not in CENTERING_MODES:
        raise ValueError(f"mode must be one of {CENTERING_MODES}, got {mode!r}")
    K = dots.shape[1]
    if mode in ("logit", "prob"):
        if center is None:
            raise ValueError(f"mode={mode!r} needs a center of shape [{K}]")
        if center.shape != (K,):
            raise ValueError(f"center must have shape [{K}], got {tuple(center.shape)}")
    if weight_norm is not None:
        if weight_norm.shape != (K,):
            raise ValueError(f"weight_norm must have shape [{K}], got {tuple(weight_norm.shape)}")
        if p is None or int(p) != p or p < 2:
            raise ValueError(f"p (the bottleneck dim) must be an integer >= 2 with weight_norm, got {p!r}")


def _debye_series(t: float, nu: float) -> float:
    """1 + U1(t)/nu + ... + U4(t)/nu^4 (DLMF 10.41.10), in float64."""
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 + t2 * (-462.0 + t2 * 385.0)) / 1152.0
    u3 = t * t2 * (30375.0 + t2 * (-369603.0 + t2 * (765765.0 - 425425.0 * t2))) / 414720.0
    u4 = t2 * t2 * (4465125.0 + t2 * (-94121676.0 + t2 * (349922430.0 + t2 * (-446185740.0
                                                                             + t2 * 185910725.0))))
    u4 /= 39813120.0
    return 1.0 + u1 / nu + u2 / nu ** 2 + u3 / nu ** 3 + u4 / nu ** 4


def debye_reference_terms(temp: float, p: int) -> tuple[float, float, float, float]:
    """Float64 terms of log C_p at the reference concentration kappa0 = 1/temp, for the in-kernel bias.

    With z = kappa/nu, s = sqrt(1 + z^2), the Debye form of log C_p(kappa) is, up to a constant that
    only depends on p, `nu (log(1+s) - s) + 0.5 log s - log series(1/s)`. The kernels evaluate
    `bias = log C_p(kappa) - log C_p(kappa0)` as differences of these terms, so the large p-dependent
    constant (about +344 at p = 256) never reaches fp32. Returns (nu, z0, s0, log series(1/s0)).
    """
    nu = p / 2.0 - 1.0
    z0 = (1.0 / temp) / nu
    s0 = math.sqrt(1.0 + z0 * z0)
    return nu, z0, s0, math.log(_debye_series(1.0 / s0, nu))


def column_bias_in_kernel(weight_norm: torch.Tensor | None, p: int | None) -> bool:
    """Whether the kernels compute the vMF column bias themselves (Debye, p >= 32)."""
    return weight_norm is not None and p >= MIN_P_IN_KERNEL_BIAS


def precomputed_column_bias(weight_norm: torch.Tensor, temp: float, p: int) -> torch.Tensor:
    """[K] fp32 bias from the float64 dinovmf.vmf module, for p < 32 where Debye is not accurate."""
    from dinovmf.vmf import vmf_column_bias

    return vmf_column_bias(weight_norm.double(), temp, p).float().contiguous()


def allreduce_logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """In place: x <- log(sum over ranks of exp(x)), when torch.distributed is initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    m = x.clone()
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m)
    torch.distributed.all_reduce(s)
    x.copy_(m + torch.log(s))
    return x


def sinkhorn_knopp(row_lse: Callable[[torch.Tensor], torch.Tensor],
                   col_lse: Callable[[torch.Tensor], torch.Tensor],
                   row_softmax: Callable[[torch.Tensor], torch.Tensor], N: int, K: int,
                   device: torch.device) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp on Q = exp(x) [N, K] in log space, backend kernels doing the passes.

    DINOv2 alternates `Q /= Q.sum(rows) * K` (per prototype) and `Q /= Q.sum(cols) * B` (per sample),
    starting from Q = exp(x) / sum(Q). Scalar factors cancel, so in log space with per-prototype
    offsets `a` and per-sample offsets `v` this is, for each iteration,
        a_k = -logsumexp_b(x_bk + v_b),   v_b = -logsumexp_k(x_bk + a_k),
    from v = 0, and the result is softmax_k(x_bk + a_k). The three callables each read x once:
    `col_lse(v) -> [K]`, `row_lse(a) -> [N]` and `row_softmax(a) -> probs [N, K]`. The column
    log-sum-exp is reduced over ranks, so the iteration runs over the global batch.
    """
    v = torch.zeros(N, device=device, dtype=torch.float32)
    a = None
    for it in range(SINKHORN_ITERATIONS):
        a = -allreduce_logsumexp_(col_lse(v))
        if it + 1 < SINKHORN_ITERATIONS:
            v = -row_lse(a)
    return row_softmax(a)
