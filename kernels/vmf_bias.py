"""The vMF column bias log C_p(||w_k||/temp) - log C_p(1/temp) in Triton (Debye expansion, p >= 32).

`vmf_column_bias_triton` computes the [K] bias with one launch of `_column_bias_kernel`. The training path
does not call it today: `dinovmf.centering.teacher_bias` / `dinovmf.head_loss` compute the bias once per step
in float64 (`dinovmf.vmf`) and the row kernels take it as a [K] input. It stays as the one-launch GPU
alternative to those ~20 small float64 ops, tested against `vmf_column_bias` (tests/test_kernels_triton.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinovmf.kernels.common import MIN_P_IN_KERNEL_BIAS, debye_reference_terms

BIAS_BLOCK_K = 1024  # one [K] pass per step: 64 programs at K = 65536
BIAS_NUM_WARPS = 4


@triton.jit
def log_cp_diff(kappa, nu, z0, s0, log_series0):
    """log C_p(kappa) - log C_p(kappa0) from the Debye expansion with U1..U4, in fp32.

    Uses the form `nu (log(1+s) - s) + 0.5 log s - log series(1/s)` (constants in p dropped, see
    kernels/common.py) and writes s - s0 as (z - z0)(z + z0)/(s + s0) so kappa near kappa0 loses no bits.
    """
    z = kappa / nu
    s = tl.sqrt(1.0 + z * z)
    t = 1.0 / s
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 + t2 * (-462.0 + t2 * 385.0)) / 1152.0
    u3 = t * t2 * (30375.0 + t2 * (-369603.0 + t2 * (765765.0 - 425425.0 * t2))) / 414720.0
    u4 = t2 * t2 * (4465125.0 + t2 * (-94121676.0 + t2 * (349922430.0 + t2 * (-446185740.0
                                                                             + t2 * 185910725.0))))
    u4 = u4 / 39813120.0
    inv_nu = 1.0 / nu
    series = 1.0 + inv_nu * (u1 + inv_nu * (u2 + inv_nu * (u3 + inv_nu * u4)))
    ds = (z - z0) * (z + z0) / (s + s0)
    # log((1+s)/(1+s0)) = log1p(ds/(1+s0)): with nu up to ~1e3 multiplying it, a plain log of a ratio
    # near 1 would cost nu * 6e-8 absolute error.
    return nu * (_log1p(ds / (1.0 + s0)) - ds) + 0.5 * tl.log(s / s0) - tl.log(series) + log_series0


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small x (Goldberg's trick: the rounding of 1 + x cancels)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _column_bias_kernel(WN, OUT, K, inv_temp, nu, z0, s0, log_series0, BLOCK_K: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    wn = tl.load(WN + offs, mask=mask, other=1.0).to(tl.float32)
    tl.store(OUT + offs, log_cp_diff(wn * inv_temp, nu, z0, s0, log_series0), mask=mask)


def vmf_column_bias_triton(weight_norm: torch.Tensor, temp: float, p: int) -> torch.Tensor:
    """[K] fp32 `log C_p(||w_k||/temp) - log C_p(1/temp)` computed by the in-kernel Debye path (p >= 32)."""
    if p < MIN_P_IN_KERNEL_BIAS:
        raise ValueError(f"p must be >= {MIN_P_IN_KERNEL_BIAS} for the in-kernel Debye bias, got {p}")
    if weight_norm.dim() != 1:
        raise ValueError(f"weight_norm must be [K], got shape {tuple(weight_norm.shape)}")
    wn = weight_norm.contiguous()
    out = torch.empty(wn.shape[0], device=wn.device, dtype=torch.float32)
    nu, z0, s0, ls0 = debye_reference_terms(temp, p)
    _column_bias_kernel[(triton.cdiv(wn.shape[0], BIAS_BLOCK_K),)](wn, out, wn.shape[0], 1.0 / temp, nu, z0, s0, ls0,
                                                                  BLOCK_K=BIAS_BLOCK_K, num_warps=BIAS_NUM_WARPS)
    return out
