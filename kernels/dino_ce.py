"""Fused DINO cross-entropy in Triton: forward (online LSE + dot with the summed teacher probs) and
backward (softmax recomputed from the logits), one program per student row.

For student row (s, b) with Pbar = sum_{t < T, t != s} P_t[b] (summed on the fly, never stored):
    loss_sb = sum_k(Pbar) * LSE(l_sb) - Pbar . l_sb,      dL/dl_sb = (sum_k(Pbar) softmax(l_sb) - Pbar) * g / (n_pairs B).
sum_k(Pbar) is n_s for normalised teacher rows; using the actual sum keeps the op exactly equal to
`-sum_k P_t log_softmax(l_s)` for any teacher input. The forward saves two floats per row (LSE, sum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinovmf.kernels.common import check_ce_inputs, pair_count


def _block_k(K: int) -> int:
    # 4096 fp32 lanes = 16 KiB per tile; big tiles also keep the CPU interpreter's per-tile overhead low.
    return min(4096, triton.next_power_of_2(K))


@triton.jit
def _ce_fwd_kernel(L, P, ROW_LOSS, ROW_LSE, ROW_PSUM, B, K, T, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = row // B
    b = row % B
    l_row = L + row * K
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)  # per-lane running max ...
    acc = tl.zeros([BLOCK_K], tl.float32)  # ... and sum of exp(l - m): the online LSE
    dot = tl.zeros([BLOCK_K], tl.float32)
    psum = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        l = tl.load(l_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, l)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding
        acc = acc * tl.exp(m - m_safe) + tl.exp(l - m_safe)
        m = m_new
        pbar = tl.zeros([BLOCK_K], tl.float32)
        for t in range(0, T):
            # view s is not paired with itself: a zero bound masks the whole load, which fetches nothing
            k_end = tl.where(t != s, K, 0)
            pbar += tl.load(P + (t * B + b) * K + offs, mask=offs < k_end, other=0.0).to(tl.float32)
        dot += pbar * tl.where(mask, l, 0.0)
        psum += pbar
    m_max = tl.max(m, axis=0)
    lse = m_max + tl.log(tl.sum(acc * tl.exp(m - m_max), axis=0))
    psum_row = tl.sum(psum, axis=0)
    tl.store(ROW_LOSS + row, psum_row * lse - tl.sum(dot, axis=0))
    tl.store(ROW_LSE + row, lse)
    tl.store(ROW_PSUM + row, psum_row)


@triton.jit
def _ce_bwd_kernel(L, P, ROW_LSE, ROW_PSUM, G, DL, B, K, T, scale, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = row // B
    b = row % B
    g = tl.load(G).to(tl.float32) * scale  # read on device: no host sync for the upstream gradient
    lse = tl.load(ROW_LSE + row)
    psum = tl.load(ROW_PSUM + row)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        l = tl.load(L + row * K + offs, mask=mask, other=0.0).to(tl.float32)
        pbar = tl.zeros([BLOCK_K], tl.float32)
        for t in range(0, T):
            k_end = tl.where(t != s, K, 0)
            pbar += tl.load(P + (t * B + b) * K + offs, mask=offs < k_end, other=0.0).to(tl.float32)
        grad = (psum * tl.exp(l - lse) - pbar) * g
        tl.store(DL + row * K + offs, grad.to(DL.dtype.element_ty), mask=mask)


class DinoCrossEntropyTriton(torch.autograd.Function):
    """Autograd wrapper: saves the inputs (no copies) and the per-row LSE and teacher mass."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        S, B, K = student_logits.shape
        T = teacher_probs.shape[0]
        logits = student_logits.contiguous()
        probs = teacher_probs.contiguous()
        stats = torch.empty(3, S * B, device=logits.device, dtype=torch.float32)
        row_loss, row_lse, row_psum = stats
        _ce_fwd_kernel[(S * B,)](logits, probs, row_loss, row_lse, row_psum, B, K, T,
                                 BLOCK_K=_block_k(K), num_warps=8)
        ctx.save_for_backward(logits, probs, row_lse, row_psum)
        ctx.scale = 1.0 / (pair_count(S, T) * B)
        return row_loss.sum() * ctx.scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, probs, row_lse, row_psum = ctx.saved_tensors
        S, B, K = logits.shape
        grad = torch.empty_like(logits)
        _ce_bwd_kernel[(S * B,)](logits, probs, row_lse, row_psum, grad_out.float().contiguous(), grad,
                                 B, K, probs.shape[0], ctx.scale, BLOCK_K=_block_k(K), num_warps=8)
        return grad, None


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over DINO pairs and batch of -sum_k P_t log_softmax(l_s): fp32 scalar, differentiable in
    `student_logits` [S, B, K] (any float dtype); `teacher_probs` [T, B, K] is treated as a constant."""
    check_ce_inputs(student_logits, teacher_probs)
    return DinoCrossEntropyTriton.apply(student_logits, teacher_probs.detach())
