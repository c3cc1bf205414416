"""`ce_rows` in Triton: the fused DINO / iBOT cross-entropy of one chunk of student rows (contract in
docs/INTERFACES.md, "fused head-to-loss op"), forward statistics and gradient, no autograd inside.

For chunk row i (global student row `row_index[i]` = s*B + b) with logits l = logits_i * col_scale + bias:
    Pbar_i = sum_{t < T, t != s} P[t*B + b]   (DINO pairing)   or   P[row_index[i]]   (same view)
    loss_i = psum_i LSE(l) - Pbar_i . l,   G_i = (psum_i softmax(l) - Pbar_i) * grad_scale * w_i
Three launches, on the grids of `kernels.tiling` (column blocks x row groups):
1. `_ce_partials_kernel` reads the logits and teacher rows once and writes, per (row, column range of
   2048), the range's softmax statistics (m, s, t, see `kernels.softmax_tiles`), Pbar.(l - m) and psum:
   20 bytes per 2048 columns.
2. `_ce_finish_kernel` merges a row's ranges into the row statistics [4, c].
3. `_ce_grad_kernel` (only with grad_out or col_grad_sum) reads logits and teacher rows again, writes
   G * col_scale (in place over the logits if asked) and the column sums of G from registers: no
   atomics, deterministic. It walks its rows in reverse, starting on the rows pass 1 read last, which
   are the likeliest to be still in L2 (all of them when the chunk's logits fit in L2).
All arithmetic is fp32. A lane sums range/128 = 16 terms, a row's 32 lanes and K / 2048 ranges are
summed by trees and the finish kernel: for K <= 131072 no fp32 sum has more than 64 sequential terms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinovmf.kernels import tiling
from dinovmf.kernels.common import KernelLayout, check_ce_rows_inputs, check_visit_inner
from dinovmf.kernels.softmax_tiles import (merge_partials, online_exp_update, online_rescale, partials_max,
                                           partials_tile, zero_if_empty)

N_PARTIALS = 5  # m, s, t, Pbar.(l - m), psum per (row, column range)


@triton.jit
def _visited_rows(p, visit_inner, visit_outer):
    """Chunk row visited at position p: p itself when visit_inner == 1; else (p % inner) * outer +
    p // inner, which walks view-major rows [S*B] image-major (inner = S, outer = B)."""
    return (p % visit_inner) * visit_outer + p // visit_inner


@triton.jit
def _teacher_mass(P, stride_p, gi, mask2, cols, B, T, SAME_VIEW: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Pbar for the tile's rows (global indices gi) and columns cols [1, C]: the paired teacher rows summed.
    Rows of one image are adjacent in the chunk, so a tile mostly re-reads the same teacher rows (L1 hits)."""
    if SAME_VIEW:
        return tl.load(P + gi.to(tl.int64)[:, None] * stride_p + cols, mask=mask2, other=0.0)
    s = gi // B  # int32: a chunk never has 2^31 rows
    b = gi % B
    pbar = tl.zeros([ROWS, BLOCK_C], tl.float32)
    for t in range(0, T):
        paired = mask2 & (s != t)[:, None]  # a view is not paired with itself: that load is skipped
        pbar += tl.load(P + (t * B + b).to(tl.int64)[:, None] * stride_p + cols, mask=paired, other=0.0)
    return pbar


@triton.jit
def _ce_partials_kernel(L, stride_l, CS, BIAS, P, stride_p, ROW_INDEX, PART, n_rows, K, B, T, range_c,
                        rows_per_group, visit_inner, visit_outer, HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SAME_VIEW: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr):
    """PART[:, j, row] = (m, s, t, Pbar.(l - m), psum) of the row over columns [j*range_c, (j+1)*range_c)."""
    c_start, c_end, start, end, offset, plane = tiling.stats_program(n_rows, K, range_c, rows_per_group)
    for p0 in range(start, end, ROWS):
        p = p0 + tl.arange(0, ROWS)
        rmask = p < end
        r = _visited_rows(p, visit_inner, visit_outer)
        gi = tl.load(ROW_INDEX + r, mask=rmask, other=0).to(tl.int32)
        row_ptr = L + r.to(tl.int64)[:, None] * stride_l
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS, STEP], tl.float32)
        t = tl.zeros([ROWS, STEP], tl.float32)
        dot = tl.zeros([ROWS, STEP], tl.float32)  # Pbar.(l - m), <= 0 term by term: no cancellation later
        psum = tl.zeros([ROWS, STEP], tl.float32)
        for c0 in range(c_start, c_end, STEP):
            cols = c0 + tl.arange(0, STEP)[None, :]
            cmask = cols < c_end
            cols2 = cols + tl.zeros([ROWS, 1], tl.int32)  # the tile's layout: see tiling.column_vector
            cs = tiling.column_vector(CS, cols2, cmask, HAS_CS, 1.0)
            bias = tiling.column_vector(BIAS, cols2, cmask, HAS_BIAS, 0.0)
            mask2 = rmask[:, None] & cmask
            x = tl.load(row_ptr + cols, mask=mask2, other=0.0)
            y = tl.where(mask2, x.to(tl.float32) * cs + bias, float("-inf"))
            pbar = _teacher_mass(P, stride_p, gi, mask2, cols, B, T, SAME_VIEW, ROWS, STEP)
            m, ref, alpha, delta = online_rescale(m, tl.max(y, axis=1))
            dot += delta[:, None] * psum
            s, t, d = online_exp_update(s, t, y, mask2, ref, alpha, delta)
            dot += pbar * d
            psum += pbar
        part = PART + offset + r
        tl.store(part, m, mask=rmask)
        tl.store(part + plane, tl.sum(s, axis=1), mask=rmask)
        tl.store(part + 2 * plane, tl.sum(t, axis=1), mask=rmask)
        tl.store(part + 3 * plane, tl.sum(dot, axis=1), mask=rmask)
        tl.store(part + 4 * plane, tl.sum(psum, axis=1), mask=rmask)


@triton.jit
def _ce_finish_kernel(PART, STATS, n_rows, n_blocks, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """STATS [4, n_rows] = (loss_row, lse, psum, sum softmax*l) from the per-block partials."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    plane = tl.cast(n_blocks, tl.int64) * n_rows  # tl.cast: n_blocks == 1 arrives as a Python int
    m_max = partials_max(PART, n_blocks, n_rows, r, rmask, BLOCK_J)
    s_tot = tl.zeros([BLOCK_R], tl.float32)
    t_tot = tl.zeros([BLOCK_R], tl.float32)
    dot = tl.zeros([BLOCK_R], tl.float32)  # Pbar.(l - M) = sum_j Pbar_j.(l - m_j) + (m_j - M) psum_j
    psum = tl.zeros([BLOCK_R], tl.float32)
    for j0 in range(0, n_blocks, BLOCK_J):
        idx, mask = partials_tile(j0, n_blocks, n_rows, r, rmask, BLOCK_J)
        m, ds, dt = merge_partials(PART, plane, idx, mask, m_max)
        s_tot += ds
        t_tot += dt
        ps = tl.load(PART + 4 * plane + idx, mask=mask, other=0.0)
        shift = tl.where(ps > 0.0, m - zero_if_empty(m_max)[None, :], 0.0) * ps
        dot += tl.sum(tl.load(PART + 3 * plane + idx, mask=mask, other=0.0) + shift, axis=0)
        psum += tl.sum(ps, axis=0)
    log_s = tl.log(tl.where(rmask, s_tot, 1.0))  # padding rows: no log(0)
    # loss = psum LSE - Pbar.l = psum log S - Pbar.(l - M): both terms >= 0, no cancellation.
    tl.store(STATS + r, psum * log_s - dot, mask=rmask)
    tl.store(STATS + n_rows + r, m_max + log_s, mask=rmask)
    tl.store(STATS + 2 * n_rows + r, psum, mask=rmask)
    tl.store(STATS + 3 * n_rows + r, m_max + t_tot / tl.where(rmask, s_tot, 1.0), mask=rmask)


@triton.jit
def _ce_grad_kernel(L, stride_l, CS, BIAS, P, stride_p, ROW_INDEX, STATS, W, GO, stride_go, CGS,
                    n_rows, K, B, T, rows_per_group, visit_inner, visit_outer, grad_scale,
                    HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, SAME_VIEW: tl.constexpr, HAS_W: tl.constexpr,
                    WRITE_GRAD: tl.constexpr, COL_SUM: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """G = (psum softmax(l) - Pbar) * grad_scale [* W[row]]; GO = G * col_scale (WRITE_GRAD);
    COL_SUM 1: CGS[cols] += sum_rows G (one row group owns the columns), 2: CGS[g, cols] = sum_rows G."""
    g, cols, cmask, start, group_end = tiling.stream_program(n_rows, K, rows_per_group, BLOCK_C)
    cs = tiling.column_vector(CS, cols, cmask, HAS_CS, 1.0)  # once per program
    bias = tiling.column_vector(BIAS, cols, cmask, HAS_BIAS, 0.0)
    n_tiles = tl.cdiv(group_end - start, ROWS)
    end = start + n_tiles * ROWS
    col_acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
    for i in range(0, n_tiles):
        p = end - (i + 1) * ROWS + tl.arange(0, ROWS)  # last tile first: it is still in L2 after pass 1
        rmask = p < n_rows
        r = _visited_rows(p, visit_inner, visit_outer)
        mask2 = rmask[:, None] & cmask
        r64 = r.to(tl.int64)
        x = tl.load(L + r64[:, None] * stride_l + cols, mask=mask2, other=0.0)
        l = x.to(tl.float32) * cs + bias
        gi = tl.load(ROW_INDEX + r, mask=rmask, other=0).to(tl.int32)
        pbar = _teacher_mass(P, stride_p, gi, mask2, cols, B, T, SAME_VIEW, ROWS, BLOCK_C)
        lse = tl.load(STATS + n_rows + r, mask=rmask, other=0.0)
        psum = tl.load(STATS + 2 * n_rows + r, mask=rmask, other=0.0)
        w = tl.full([ROWS], 1.0, tl.float32) * grad_scale
        if HAS_W:
            w = w * tl.load(W + r, mask=rmask, other=0.0)
        grad = (psum[:, None] * tl.exp(l - lse[:, None]) - pbar) * w[:, None]
        grad = tl.where(mask2, grad, 0.0)
        if COL_SUM != 0:
            col_acc += grad  # reduced over rows once, after the loop
        if WRITE_GRAD:
            tl.store(GO + r64[:, None] * stride_go + cols, (grad * cs).to(GO.dtype.element_ty), mask=mask2)
    if COL_SUM != 0:
        col_sum = tl.sum(col_acc, axis=0)[None, :]
        if COL_SUM == 1:
            tl.store(CGS + cols, tl.load(CGS + cols, mask=cmask, other=0.0) + col_sum, mask=cmask)
        else:
            tl.store(CGS + g.to(tl.int64) * K + cols, col_sum, mask=cmask)


_ce_partials = tiling.tuned(_ce_partials_kernel)


LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# How these kernels read their inputs: rows through their stride, [K] / [c] vectors and the teacher
# probabilities as float32 as they are (no conversion on the host).
LAYOUT = KernelLayout(strided_rows=True, dtypes=LOGIT_DTYPES, float32_vectors=True)


def ce_row_stats(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, *, visit_inner=1,
                 plan=None) -> torch.Tensor:
    """Passes 1 and 2: the row statistics [4, c] (loss_row, lse, psum, sum softmax*l)."""
    c, K = logits.shape
    dev = logits.device
    stats = torch.empty(4, c, device=dev, dtype=torch.float32)
    if c == 0:
        return stats
    grid = (plan or tiling.column_plan(c, K, dev, logits.element_size())).stats
    part = torch.empty(N_PARTIALS, grid.n_col_blocks, c, device=dev, dtype=torch.float32)
    dummy = part
    tiling.launch(_ce_partials, grid.grid, logits, logits.stride(0), col_scale if col_scale is not None else dummy,
                  bias if bias is not None else dummy, teacher_probs, teacher_probs.stride(0), row_index, part, c, K,
                  B, T, grid.cols, grid.rows_per_group, visit_inner, c // visit_inner, HAS_CS=col_scale is not None,
                  HAS_BIAS=bias is not None, SAME_VIEW=bool(same_view), STEP=grid.step)
    _ce_finish_kernel[(triton.cdiv(c, tiling.FINISH_BLOCK_R),)](part, stats, c, grid.n_col_blocks,
                                                                BLOCK_R=tiling.FINISH_BLOCK_R,
                                                                BLOCK_J=tiling.FINISH_BLOCK_J, num_warps=4)
    return stats


def ce_row_grad(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight, grad_scale,
                grad_out, col_grad_sum, stats, *, visit_inner=1, plan=None) -> None:
    """Pass 3: grad_out = G * col_scale and col_grad_sum += G.sum(0), from the row statistics."""
    c, K = logits.shape
    if c == 0 or (grad_out is None and col_grad_sum is None):
        return
    dev = logits.device
    grid = (plan or tiling.column_plan(c, K, dev, logits.element_size())).stream
    col_sum_mode, cgs = 0, stats
    if col_grad_sum is not None:
        if grid.groups == 1:
            col_sum_mode, cgs = 1, col_grad_sum
        else:
            col_sum_mode, cgs = 2, torch.empty(grid.groups, K, device=dev, dtype=torch.float32)
    tiling.launch(_ce_grad_kernel, grid.grid, logits, logits.stride(0), col_scale if col_scale is not None else stats,
                  bias if bias is not None else stats, teacher_probs, teacher_probs.stride(0), row_index, stats,
                  row_weight if row_weight is not None else stats,
                  grad_out if grad_out is not None else logits, grad_out.stride(0) if grad_out is not None else 0,
                  cgs, c, K, B, T, grid.rows_per_group, visit_inner, c // visit_inner, float(grad_scale),
                  HAS_CS=col_scale is not None, HAS_BIAS=bias is not None, SAME_VIEW=bool(same_view),
                  HAS_W=row_weight is not None, WRITE_GRAD=grad_out is not None, COL_SUM=col_sum_mode,
                  BLOCK_C=grid.cols)
    if col_sum_mode == 2:
        col_grad_sum += cgs.sum(0)


def ce_rows(logits: torch.Tensor, col_scale: torch.Tensor | None, bias: torch.Tensor | None,
            teacher_probs: torch.Tensor, row_index: torch.Tensor, B: int, T: int, same_view: bool,
            row_weight: torch.Tensor | None, grad_scale: float, grad_out: torch.Tensor | None,
            col_grad_sum: torch.Tensor | None, *, visit_inner: int = 1,
            plan: tiling.ColumnPlan | None = None) -> torch.Tensor:
    """The contract's `ce_rows` (see the module docstring): returns the row statistics [4, c] fp32
    (loss_row, lse, psum, sum softmax*l); writes G * col_scale to `grad_out` (which may be `logits`
    itself) and adds G.sum(0) to `col_grad_sum` when they are given. Rows may have any stride as long
    as the columns are contiguous. `visit_inner` is the contract's visiting-order hint (`_visited_rows`:
    S for view-major [S*B] rows walks them image by image, so a tile's rows share their teacher rows in
    L1); `plan` forces the launch geometry (tests)."""
    check_ce_rows_inputs(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight, grad_out,
                         col_grad_sum, LAYOUT)
    check_visit_inner(visit_inner, logits.shape[0])
    plan = plan or tiling.column_plan(logits.shape[0], logits.shape[1], logits.device, logits.element_size())
    stats = ce_row_stats(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view,
                         visit_inner=visit_inner, plan=plan)
    ce_row_grad(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight, grad_scale, grad_out,
                col_grad_sum, stats, visit_inner=visit_inner, plan=plan)
    return stats
