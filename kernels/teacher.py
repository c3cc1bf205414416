"""`teacher_rows` in Triton: the teacher distribution of every centering mode, its center statistic, and
the per-row entropy and argmax as by-products (contract in docs/INTERFACES.md). The public
`dinovmf.centering.teacher_distribution(..., backend="triton")` is host code on top of it.

With r = dots * col_scale + temp * bias (bias precomputed once per step) and x = r / temp, the output is
probs = softmax(y) row by row, where
    logit:    y = x - center / temp        stat = mean_rows(r)
    prob:     y = x - log(center)          stat = mean_rows(softmax(x))
    none:     y = x                        no stat
    sinkhorn: y = x + a, the column offsets of 3 Sinkhorn-Knopp rounds (`kernels.common.sinkhorn_knopp`)
The host folds y's column offsets (bias, center or Sinkhorn offsets) into one [K] vector per call, so
the kernels see y = dots * col_scale / temp + b_y. Launches, on the grids of `kernels.tiling`:
1. `_teacher_partials_kernel`: per (row, column range) the streaming softmax statistics of y (and of x
   for `prob`) and the range's argmax; `_teacher_finish_kernel` merges them into LSE, entropy, argmax.
2. `_teacher_probs_kernel`: writes probs (over the dots when out aliases them) and the center
   statistic as column sums held in registers: no atomics, deterministic.
Sinkhorn adds `_column_lse_kernel` (a column log-sum-exp over rows, per column block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinovmf.kernels import tiling
from dinovmf.kernels.common import CENTERING_MODES, KernelLayout, check_teacher_rows_inputs, sinkhorn_knopp
from dinovmf.kernels.softmax_tiles import (column_lse_step, merge_block_stats, merge_partials, online_exp_sum,
                                           online_exp_update, online_rescale, partials_max, partials_tile)

STAT_NONE, STAT_MEAN_SCORE, STAT_MEAN_SOFTMAX = 0, 1, 2  # the center statistic of none/sinkhorn, logit, prob
_STAT_KIND = {"none": STAT_NONE, "logit": STAT_MEAN_SCORE, "prob": STAT_MEAN_SOFTMAX, "sinkhorn": STAT_NONE}
N_PARTIALS = 5  # m, s, t of y and m, s of x (prob mode) per (row, column range), plus an int32 argmax
DOTS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows read through their stride; center, col_scale, bias and out float32 as they are.
LAYOUT = KernelLayout(strided_rows=True, dtypes=DOTS_DTYPES, float32_vectors=True)


@triton.jit
def _dots_tile(D, stride_d, p0, end, cols, cmask, ROWS: tl.constexpr):
    """Rows r = p0 .. p0 + ROWS (below `end`) at columns cols [1, C]: (r, row mask, tile mask, dots fp32)."""
    r = p0 + tl.arange(0, ROWS)
    rmask = r < end
    mask2 = rmask[:, None] & cmask
    d = tl.load(D + r.to(tl.int64)[:, None] * stride_d + cols, mask=mask2, other=0.0).to(tl.float32)
    return r, rmask, mask2, d


@triton.jit
def _teacher_partials_kernel(D, stride_d, CS, BIAS, BY, PART, ARGMAX_PART, n_rows, K, inv_temp, range_c,
                             rows_per_group, HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BY: tl.constexpr,
                             WITH_X: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr):
    """PART[:, j, row] = (m, s, t of y; m, s of x if WITH_X) and ARGMAX_PART[j, row] = argmax of y, over the
    columns [j*range_c, (j+1)*range_c), with x = dots * cs / temp + bias and y = dots * cs / temp + BY."""
    c_start, c_end, start, end, offset, plane = tiling.stats_program(n_rows, K, range_c, rows_per_group)
    for p0 in range(start, end, ROWS):
        rmask = p0 + tl.arange(0, ROWS) < end
        m = tl.full([ROWS], float("-inf"), tl.float32)
        arg = tl.zeros([ROWS], tl.int32)
        s = tl.zeros([ROWS, STEP], tl.float32)
        t = tl.zeros([ROWS, STEP], tl.float32)
        m_x = tl.full([ROWS], float("-inf"), tl.float32)  # prob mode: the uncentred softmax, for the stat
        s_x = tl.zeros([ROWS, STEP], tl.float32)
        for c0 in range(c_start, c_end, STEP):
            cols = c0 + tl.arange(0, STEP)[None, :]
            cmask = cols < c_end
            cols2 = cols + tl.zeros([ROWS, 1], tl.int32)  # the tile's layout: see tiling.column_vector
            a = tiling.column_vector(CS, cols2, cmask, HAS_CS, 1.0) * inv_temp
            r, _, mask2, d = _dots_tile(D, stride_d, p0, end, cols, cmask, ROWS)
            if WITH_X or not HAS_BY:
                b_x = tiling.column_vector(BIAS, cols2, cmask, HAS_BIAS, 0.0)
            if HAS_BY:
                b_y = tl.load(BY + cols2, mask=cmask, other=0.0)
            else:
                b_y = b_x
            y = tl.where(mask2, d * a + b_y, float("-inf"))
            y_max, y_arg = tl.max(y, axis=1, return_indices=True)  # ties: the lowest index (the default)
            arg = tl.where(y_max > m, c0 + y_arg, arg)  # strictly greater: an earlier step keeps a tie
            m, ref, alpha, delta = online_rescale(m, y_max)
            s, t, _ = online_exp_update(s, t, y, mask2, ref, alpha, delta)
            if WITH_X:
                x = tl.where(mask2, d * a + b_x, float("-inf"))
                m_x, ref_x, alpha_x, _ = online_rescale(m_x, tl.max(x, axis=1))
                s_x = online_exp_sum(s_x, x, mask2, ref_x, alpha_x)
        r = p0 + tl.arange(0, ROWS)
        tl.store(PART + offset + r, m, mask=rmask)
        tl.store(PART + plane + offset + r, tl.sum(s, axis=1), mask=rmask)
        tl.store(PART + 2 * plane + offset + r, tl.sum(t, axis=1), mask=rmask)
        tl.store(ARGMAX_PART + offset + r, arg, mask=rmask)
        if WITH_X:
            tl.store(PART + 3 * plane + offset + r, m_x, mask=rmask)
            tl.store(PART + 4 * plane + offset + r, tl.sum(s_x, axis=1), mask=rmask)


@triton.jit
def _teacher_finish_kernel(PART, ARGMAX_PART, ROW_STATS, ROW_ARGMAX, n_rows, n_blocks, K, HAS_X: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """ROW_STATS [3, n_rows] = (LSE(y), entropy(softmax(y)), LSE(x)); ROW_ARGMAX [n_rows] int64."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    plane = tl.cast(n_blocks, tl.int64) * n_rows  # tl.cast: n_blocks == 1 arrives as a Python int
    m_max = partials_max(PART, n_blocks, n_rows, r, rmask, BLOCK_J)
    if HAS_X:
        mx_max = partials_max(PART + 3 * plane, n_blocks, n_rows, r, rmask, BLOCK_J)
    s_tot = tl.zeros([BLOCK_R], tl.float32)
    t_tot = tl.zeros([BLOCK_R], tl.float32)
    sx_tot = tl.zeros([BLOCK_R], tl.float32)
    argmax = tl.full([BLOCK_R], K, tl.int32)
    for j0 in range(0, n_blocks, BLOCK_J):
        idx, mask = partials_tile(j0, n_blocks, n_rows, r, rmask, BLOCK_J)
        m, ds, dt = merge_partials(PART, plane, idx, mask, m_max)
        s_tot += ds
        t_tot += dt
        # The row's argmax: the lowest column among the ranges that reach the row maximum.
        block_arg = tl.load(ARGMAX_PART + idx, mask=mask, other=0)
        argmax = tl.minimum(argmax, tl.min(tl.where(mask & (m == m_max[None, :]), block_arg, K), axis=0))
        if HAS_X:
            m_x = tl.load(PART + 3 * plane + idx, mask=mask, other=float("-inf"))
            dsx, _ = merge_block_stats(m_x, tl.load(PART + 4 * plane + idx, mask=mask, other=0.0),
                                       tl.zeros([BLOCK_J, BLOCK_R], tl.float32), mx_max)
            sx_tot += dsx
    s_tot = tl.where(rmask, s_tot, 1.0)  # padding rows: no log(0)
    log_s = tl.log(s_tot)
    tl.store(ROW_STATS + r, m_max + log_s, mask=rmask)
    tl.store(ROW_STATS + n_rows + r, log_s - t_tot / s_tot, mask=rmask)
    if HAS_X:
        tl.store(ROW_STATS + 2 * n_rows + r, mx_max + tl.log(tl.where(rmask, sx_tot, 1.0)), mask=rmask)
    tl.store(ROW_ARGMAX + r, argmax.to(tl.int64), mask=rmask)


@triton.jit
def _teacher_probs_kernel(D, stride_d, CS, BIAS, BY, ROW_STATS, OUT, stride_o, STAT, n_rows, K, temp, inv_temp,
                          inv_n, rows_per_group, HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BY: tl.constexpr,
                          STAT_KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT = exp(y - LSE(y)); STAT[g, cols] = this row group's share of the center statistic: STAT_KIND 1
    mean_rows(r) (logit centering), 2 mean_rows(softmax(x)) (prob centering), 0 none."""
    g, cols, cmask, start, end = tiling.stream_program(n_rows, K, rows_per_group, BLOCK_C)
    cs = tiling.column_vector(CS, cols, cmask, HAS_CS, 1.0)  # once per program, outside the loop
    a = cs * inv_temp
    b_x = tiling.column_vector(BIAS, cols, cmask, HAS_BIAS, 0.0)
    if HAS_BY:
        b_y = tl.load(BY + cols, mask=cmask, other=0.0)
    else:
        b_y = b_x
    col_acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
    for p0 in range(start, end, ROWS):
        r, rmask, mask2, d = _dots_tile(D, stride_d, p0, end, cols, cmask, ROWS)
        lse_y = tl.load(ROW_STATS + r, mask=rmask, other=0.0)
        tl.store(OUT + r.to(tl.int64)[:, None] * stride_o + cols, tl.exp(d * a + b_y - lse_y[:, None]), mask=mask2)
        if STAT_KIND == 1:  # mean_rows(r) = mean_rows(dots) * cs + temp * bias
            col_acc += d  # masked lanes were loaded as 0
        if STAT_KIND == 2:
            lse_x = tl.load(ROW_STATS + 2 * n_rows + r, mask=rmask, other=0.0)
            col_acc += tl.where(mask2, tl.exp(d * a + b_x - lse_x[:, None]), 0.0)
    if STAT_KIND != 0:
        stat = tl.sum(col_acc, axis=0)[None, :] * inv_n
        if STAT_KIND == 1:
            stat = stat * cs + tl.where(g == 0, temp * b_x, 0.0)
        tl.store(STAT + g.to(tl.int64) * K + cols, stat, mask=cmask)


@triton.jit
def _column_lse_kernel(D, stride_d, CS, BIAS, ROW_SHIFT, OUT, n_rows, K, inv_temp, rows_per_group,
                       HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[g, k] = logsumexp over the group's rows n of (x[n, k] + ROW_SHIFT[n])."""
    g, cols, cmask, start, end = tiling.stream_program(n_rows, K, rows_per_group, BLOCK_C)
    a = tiling.column_vector(CS, cols, cmask, HAS_CS, 1.0) * inv_temp
    b_x = tiling.column_vector(BIAS, cols, cmask, HAS_BIAS, 0.0)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(start, end, ROWS):
        r, rmask, mask2, d = _dots_tile(D, stride_d, p0, end, cols, cmask, ROWS)
        v = tl.load(ROW_SHIFT + r, mask=rmask, other=0.0)
        m, s = column_lse_step(m, s, tl.where(mask2, d * a + b_x + v[:, None], float("-inf")))
    lse = (m + tl.log(tl.where(s > 0.0, s, 1.0)))[None, :]  # masked columns: no log(0)
    tl.store(OUT + g.to(tl.int64) * K + cols, lse, mask=cmask)


_teacher_partials = tiling.tuned(_teacher_partials_kernel)


class _TeacherLaunch:
    """The launches of one `teacher_rows` call, sharing its inputs and plan."""

    def __init__(self, dots, temp, col_scale, bias, plan: tiling.ColumnPlan):
        self.d, self.temp, self.plan = dots, float(temp), plan
        self.N, self.K = dots.shape
        self.f32 = dict(device=dots.device, dtype=torch.float32)
        self.dummy = torch.empty(1, **self.f32)
        self.bias_or_none = bias
        self.cs = col_scale if col_scale is not None else self.dummy
        self.bias = bias if bias is not None else self.dummy
        self.flags = dict(HAS_CS=col_scale is not None, HAS_BIAS=bias is not None)

    def y_offsets(self, mode: str, center, shift):
        """The [K] column offsets of y = dots * cs / temp + offsets (None: the bias alone), once per call."""
        if mode == "none":
            return None
        b = self.bias_or_none if self.bias_or_none is not None else torch.zeros(self.K, **self.f32)
        if mode == "logit":
            return b - center / self.temp
        if mode == "prob":
            return b - torch.log(center)
        return b + shift  # a Sinkhorn round's column offsets

    def row_stats(self, by, with_x: bool):
        """(ROW_STATS [3, N] = LSE(y), entropy, LSE(x); argmax [N] int64) for y with column offsets `by`."""
        p = self.plan.stats
        part = torch.empty(N_PARTIALS, p.n_col_blocks, self.N, **self.f32)
        arg_part = torch.empty(p.n_col_blocks, self.N, device=self.d.device, dtype=torch.int32)
        tiling.launch(_teacher_partials, p.grid, self.d, self.d.stride(0), self.cs, self.bias,
                      by if by is not None else self.dummy, part, arg_part, self.N, self.K, 1.0 / self.temp, p.cols,
                      p.rows_per_group, HAS_BY=by is not None, WITH_X=with_x, STEP=p.step, **self.flags)
        row_stats = torch.empty(3, self.N, **self.f32)
        row_argmax = torch.empty(self.N, device=self.d.device, dtype=torch.int64)
        _teacher_finish_kernel[(triton.cdiv(self.N, tiling.FINISH_BLOCK_R),)](
            part, arg_part, row_stats, row_argmax, self.N, p.n_col_blocks, self.K, HAS_X=with_x,
            BLOCK_R=tiling.FINISH_BLOCK_R, BLOCK_J=tiling.FINISH_BLOCK_J, num_warps=4)
        return row_stats, row_argmax

    def probs(self, by, row_stats, out, stat_kind: int):
        """Write probs to `out`; return the center statistic [K] (None for stat_kind 0)."""
        p = self.plan.stream
        stat = torch.empty(p.groups, self.K, **self.f32) if stat_kind else self.dummy
        tiling.launch(_teacher_probs_kernel, p.grid, self.d, self.d.stride(0), self.cs, self.bias,
                      by if by is not None else self.dummy, row_stats, out, out.stride(0), stat, self.N, self.K,
                      self.temp, 1.0 / self.temp, 1.0 / self.N, p.rows_per_group, HAS_BY=by is not None,
                      STAT_KIND=stat_kind, BLOCK_C=p.cols, **self.flags)
        if not stat_kind:
            return None
        return stat[0] if p.groups == 1 else stat.sum(0)

    def column_lse(self, row_shift):
        p = self.plan.columns
        out = torch.empty(p.groups, self.K, **self.f32)
        tiling.launch(_column_lse_kernel, p.grid, self.d, self.d.stride(0), self.cs, self.bias, row_shift, out,
                      self.N, self.K, 1.0 / self.temp, p.rows_per_group, BLOCK_C=p.cols, **self.flags)
        return out[0] if p.groups == 1 else torch.logsumexp(out, dim=0)


def teacher_rows(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None = None,
                 col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, *,
                 plan: tiling.ColumnPlan | None = None):
    """The contract's `teacher_rows`: (probs [N, K] fp32, stat [K] fp32 or None, row_entropy [N] fp32,
    row_argmax [N] int64) with `r = dots * col_scale + temp * bias` and the modes of the module docstring.
    `out` may be `dots` itself (fp32 dots): every element is read before it is overwritten. The argmax is
    that of the row's logits y (of probs, unless two probs round to the same fp32 value)."""
    check_teacher_rows_inputs(dots, temp, mode, center, col_scale, bias, out, LAYOUT)
    N, K = dots.shape
    run = _TeacherLaunch(dots, temp, col_scale, bias, plan or tiling.column_plan(N, K, dots.device, dots.element_size()))
    out = torch.empty(N, K, **run.f32) if out is None else out
    if mode == "sinkhorn":
        final = {}

        def row_lse(a):
            return run.row_stats(run.y_offsets(mode, None, a), False)[0][0]

        def row_softmax(a):
            by = run.y_offsets(mode, None, a)
            final["stats"], final["argmax"] = run.row_stats(by, False)
            run.probs(by, final["stats"], out, 0)
            return out

        sinkhorn_knopp(row_lse=row_lse, col_lse=run.column_lse, row_softmax=row_softmax, N=N, K=K, device=dots.device)
        return out, None, final["stats"][1], final["argmax"]
    by = run.y_offsets(mode, center, None)
    row_stats, row_argmax = run.row_stats(by, mode == "prob")
    stat = run.probs(by, row_stats, out, _STAT_KIND[mode])
    return out, stat, row_stats[1], row_argmax


assert set(_STAT_KIND) == set(CENTERING_MODES)
