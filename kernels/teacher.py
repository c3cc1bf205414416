"""Fused teacher distribution in Triton: vMF column bias, centering, sharpening, softmax and the
center-update statistic, one program per teacher row (K tiled, online softmax: read, then read+write).

Row kernel, with x = dots/temp + bias (bias = vMF column term, in-kernel Debye for p >= 32):
    MODE_LOGIT:    probs = softmax(x - center/temp),   stat += (dots + temp*bias)/N   (= mean_rows(r))
    MODE_PROB:     s = softmax(x), probs = softmax(x - log center),   stat += s/N
    MODE_NONE:     probs = softmax(x)
    MODE_SHIFT:    probs = softmax(x + shift) and/or the row log-sum-exp (the Sinkhorn row step)
The stat goes through fp32 atomic adds (its summation order is not deterministic on a GPU).
Sinkhorn adds a column kernel (log-sum-exp over rows per prototype) and runs 3 row/column rounds
(see `kernels.common.sinkhorn_knopp`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinovmf.kernels.common import (check_teacher_inputs, column_bias_in_kernel, debye_reference_terms,
                                    precomputed_column_bias, sinkhorn_knopp)
from dinovmf.kernels.vmf_bias import log_cp_diff

MODE_NONE, MODE_LOGIT, MODE_PROB, MODE_SHIFT = 0, 1, 2, 3
BIAS_NONE, BIAS_DEBYE, BIAS_TENSOR = 0, 1, 2
_MODES = {"none": MODE_NONE, "logit": MODE_LOGIT, "prob": MODE_PROB}


@triton.jit
def _column_bias(WN, BIAS, offs, mask, inv_temp, nu, z0, s0, log_series0, BIAS_KIND: tl.constexpr):
    if BIAS_KIND == 1:
        wn = tl.load(WN + offs, mask=mask, other=1.0).to(tl.float32)
        return log_cp_diff(wn * inv_temp, nu, z0, s0, log_series0)
    elif BIAS_KIND == 2:
        return tl.load(BIAS + offs, mask=mask, other=0.0)
    else:
        return tl.zeros(offs.shape, tl.float32)


@triton.jit
def _shifted(x, CENTER, SHIFT, offs, mask, inv_temp, MODE: tl.constexpr):
    """The logits whose softmax is the output, from x = r/temp."""
    if MODE == 1:
        return x - tl.load(CENTER + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
    elif MODE == 2:
        return x - tl.log(tl.load(CENTER + offs, mask=mask, other=1.0).to(tl.float32))
    elif MODE == 3:
        return x + tl.load(SHIFT + offs, mask=mask, other=0.0)
    else:
        return x


@triton.jit
def _online_lse_step(m, acc, y):
    """One tile of a per-lane online log-sum-exp; lanes that only saw -inf stay (m=-inf, acc=0)."""
    m_new = tl.maximum(m, y)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, acc * tl.exp(m - m_safe) + tl.exp(y - m_safe)


@triton.jit
def _finish_lse(m, acc):
    m_max = tl.max(m, axis=0)
    return m_max + tl.log(tl.sum(acc * tl.exp(m - m_max), axis=0))


@triton.jit
def _teacher_row_kernel(D, WN, BIAS, CENTER, SHIFT, PROBS, STAT, ROW_LSE, K, temp, inv_temp, inv_n,
                        nu, z0, s0, log_series0, MODE: tl.constexpr, BIAS_KIND: tl.constexpr,
                        WRITE_PROBS: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d_row = D + row * K
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_K], tl.float32)
    m_x = tl.full([BLOCK_K], float("-inf"), tl.float32)  # MODE_PROB: the uncentred softmax as well
    acc_x = tl.zeros([BLOCK_K], tl.float32)
    # pass 1: online log-sum-exp (and the logit-mode stat, which needs no normaliser)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        d = tl.load(d_row + offs, mask=mask, other=0.0).to(tl.float32)
        bias = _column_bias(WN, BIAS, offs, mask, inv_temp, nu, z0, s0, log_series0, BIAS_KIND)
        x = d * inv_temp + bias
        y = tl.where(mask, _shifted(x, CENTER, SHIFT, offs, mask, inv_temp, MODE), float("-inf"))
        m, acc = _online_lse_step(m, acc, y)
        if MODE == 1:
            tl.atomic_add(STAT + offs, (d + temp * bias) * inv_n, mask=mask)
        if MODE == 2:
            m_x, acc_x = _online_lse_step(m_x, acc_x, tl.where(mask, x, float("-inf")))
    lse = _finish_lse(m, acc)
    if WRITE_LSE:
        tl.store(ROW_LSE + row, lse)
    # pass 2: normalise and write (the second read of the row is mostly a cache hit)
    if WRITE_PROBS:
        if MODE == 2:
            lse_x = _finish_lse(m_x, acc_x)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            d = tl.load(d_row + offs, mask=mask, other=0.0).to(tl.float32)
            bias = _column_bias(WN, BIAS, offs, mask, inv_temp, nu, z0, s0, log_series0, BIAS_KIND)
            x = d * inv_temp + bias
            y = _shifted(x, CENTER, SHIFT, offs, mask, inv_temp, MODE)
            tl.store(PROBS + row * K + offs, tl.exp(y - lse), mask=mask)
            if MODE == 2:
                tl.atomic_add(STAT + offs, tl.exp(x - lse_x) * inv_n, mask=mask)


@triton.jit
def _column_lse_kernel(D, WN, BIAS, ROW_SHIFT, OUT, N, K, inv_temp, nu, z0, s0, log_series0,
                       BIAS_KIND: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[k] = logsumexp_n(dots[n, k]/temp + bias[k] + ROW_SHIFT[n]): a block of columns per program."""
    offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    bias = _column_bias(WN, BIAS, offs, mask, inv_temp, nu, z0, s0, log_series0, BIAS_KIND)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for n in range(0, N):
        d = tl.load(D + n * K + offs, mask=mask, other=0.0).to(tl.float32)
        y = d * inv_temp + bias + tl.load(ROW_SHIFT + n)
        m, acc = _online_lse_step(m, acc, y)
    tl.store(OUT + offs, m + tl.log(acc), mask=mask)


def _block_k(K: int) -> int:
    return min(4096, triton.next_power_of_2(K))


def teacher_distribution(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None = None,
                         weight_norm: torch.Tensor | None = None, p: int | None = None):
    """Teacher probabilities [N, K] fp32 and the center statistic [K] fp32 (None for none/sinkhorn).

    `r = dots + temp * bias(weight_norm)` with the vMF column bias computed in-kernel (Debye) for
    p >= 32 and precomputed in float64 by `dinovmf.vmf` for p < 32; see docs/INTERFACES.md for the modes.
    """
    check_teacher_inputs(dots, temp, mode, center, weight_norm, p)
    d = dots.contiguous()
    N, K = d.shape
    dev = d.device
    f32 = dict(device=dev, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    nu, z0, s0, ls0 = (1.0, 0.0, 1.0, 0.0)
    if weight_norm is None:
        bias_kind, wn, bias = BIAS_NONE, dummy, dummy
    elif column_bias_in_kernel(weight_norm, p):
        bias_kind, wn, bias = BIAS_DEBYE, weight_norm.contiguous(), dummy
        nu, z0, s0, ls0 = debye_reference_terms(temp, p)
    else:
        bias_kind, wn, bias = BIAS_TENSOR, dummy, precomputed_column_bias(weight_norm, temp, p)
    block = _block_k(K)
    common = dict(nu=nu, z0=z0, s0=s0, log_series0=ls0, BIAS_KIND=bias_kind, BLOCK_K=block)

    def row_pass(mode_id, center_t, shift, write_probs, write_lse, stat):
        probs = torch.empty(N, K, **f32) if write_probs else dummy
        lse = torch.empty(N, **f32) if write_lse else dummy
        _teacher_row_kernel[(N,)](d, wn, bias, center_t, shift, probs, stat, lse, K, float(temp),
                                  1.0 / temp, 1.0 / N, MODE=mode_id, WRITE_PROBS=write_probs,
                                  WRITE_LSE=write_lse, num_warps=8, **common)
        return probs, lse

    if mode == "sinkhorn":
        def col_lse(row_shift):
            out = torch.empty(K, **f32)
            _column_lse_kernel[(triton.cdiv(K, block),)](d, wn, bias, row_shift, out, N, K, 1.0 / temp,
                                                         num_warps=8, **common)
            return out

        probs = sinkhorn_knopp(row_lse=lambda a: row_pass(MODE_SHIFT, dummy, a, False, True, dummy)[1],
                               col_lse=col_lse,
                               row_softmax=lambda a: row_pass(MODE_SHIFT, dummy, a, True, False, dummy)[0],
                               N=N, K=K, device=dev)
        return probs, None
    center_t = center.contiguous() if center is not None else dummy
    stat = torch.zeros(K, **f32) if mode in ("logit", "prob") else dummy
    probs, _ = row_pass(_MODES[mode], center_t, dummy, True, False, stat)
    return probs, (stat if mode in ("logit", "prob") else None)
