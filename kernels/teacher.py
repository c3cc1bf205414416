"""`teacher_rows` in Triton: the teacher distribution of every centering mode, its center statistic, and
the per-row entropy and argmax as by-products (contract in docs/INTERFACES.md), plus the public
`teacher_distribution` on top of it.

With r = dots * col_scale + temp * bias (bias precomputed once per step) and x = r / temp, the output is
probs = softmax(y) row by row, where
    logit:    y = x - center / temp        stat = mean_rows(r)
    prob:     y = x - log(center)          stat = mean_rows(softmax(x))
    none:     y = x                        no stat
    sinkhorn: y = x + a, the column offsets of 3 Sinkhorn-Knopp rounds (`kernels.common.sinkhorn_knopp`)
Launches, each on the column-block grid of `kernels.tiling`:
1. `_teacher_partials_kernel`: per (row, column block) the softmax statistics of y (and of x for
   `prob`) and the block's argmax; `_teacher_finish_kernel` merges them into LSE, entropy and argmax.
2. `_teacher_probs_kernel`: writes probs (over the dots when out aliases them) and the center
   statistic as column sums held in registers: no atomics, deterministic.
Sinkhorn adds `_column_lse_kernel` (a column log-sum-exp over rows, per column block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinovmf.kernels import tiling
from dinovmf.kernels.common import (CENTERING_MODES, check_teacher_inputs, column_bias_in_kernel,
                                    precomputed_column_bias, sinkhorn_knopp)
from dinovmf.kernels.softmax_tiles import column_lse_step, merge_block_stats, tile_row_stats, tile_row_stats_argmax
from dinovmf.kernels.vmf_bias import vmf_column_bias_triton

MODE_NONE, MODE_LOGIT, MODE_PROB, MODE_SHIFT = 0, 1, 2, 3
_MODES = {"none": MODE_NONE, "logit": MODE_LOGIT, "prob": MODE_PROB, "sinkhorn": MODE_SHIFT}
N_PARTIALS = 5  # m, s, t of y and m, s of x (prob mode) per (row, column block), plus an int32 argmax
DOTS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _column_terms(CS, BIAS, CENTER, SHIFT, cols, cmask, inv_temp, HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  MODE: tl.constexpr):
    """Per-column (cs, a, b_x, b_y) with x = dots * a + b_x and y = dots * a + b_y: read once per program."""
    if HAS_CS:
        cs = tl.load(CS + cols, mask=cmask, other=1.0)
    else:
        cs = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_BIAS:
        b_x = tl.load(BIAS + cols, mask=cmask, other=0.0)
    else:
        b_x = tl.zeros(cols.shape, tl.float32)
    if MODE == 1:
        b_y = b_x - tl.load(CENTER + cols, mask=cmask, other=0.0) * inv_temp
    elif MODE == 2:
        b_y = b_x - tl.log(tl.load(CENTER + cols, mask=cmask, other=1.0))
    elif MODE == 3:
        b_y = b_x + tl.load(SHIFT + cols, mask=cmask, other=0.0)
    else:
        b_y = b_x
    return cs, cs * inv_temp, b_x, b_y


@triton.jit
def _load_dots(D, stride_d, r, cols, mask2):
    return tl.load(D + r.to(tl.int64)[:, None] * stride_d + cols[None, :], mask=mask2, other=0.0).to(tl.float32)


@triton.jit
def _teacher_partials_kernel(D, stride_d, CS, BIAS, CENTER, SHIFT, PART, ARGMAX_PART, n_rows, K, inv_temp,
                             rows_per_group, HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    j = tl.program_id(0)
    cols = j * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    cs, a, b_x, b_y = _column_terms(CS, BIAS, CENTER, SHIFT, cols, cmask, inv_temp, HAS_CS, HAS_BIAS, MODE)
    start = tl.program_id(1) * rows_per_group
    end = tl.minimum(start + rows_per_group, n_rows)
    offset = j.to(tl.int64) * n_rows
    plane = tl.num_programs(0).to(tl.int64) * n_rows
    for p0 in range(start, end, ROWS):
        r = p0 + tl.arange(0, ROWS)
        rmask = r < end
        mask2 = rmask[:, None] & cmask[None, :]
        d = _load_dots(D, stride_d, r, cols, mask2)
        m, s, t, idx = tile_row_stats_argmax(tl.where(mask2, d * a[None, :] + b_y[None, :], float("-inf")))
        tl.store(PART + offset + r, m, mask=rmask)
        tl.store(PART + plane + offset + r, s, mask=rmask)
        tl.store(PART + 2 * plane + offset + r, t, mask=rmask)
        tl.store(ARGMAX_PART + offset + r, j * BLOCK_C + idx, mask=rmask)
        if MODE == 2:  # the uncentred softmax, for the statistic
            m_x, s_x, _ = tile_row_stats(tl.where(mask2, d * a[None, :] + b_x[None, :], float("-inf")))
            tl.store(PART + 3 * plane + offset + r, m_x, mask=rmask)
            tl.store(PART + 4 * plane + offset + r, s_x, mask=rmask)


@triton.jit
def _teacher_finish_kernel(PART, ARGMAX_PART, ROW_STATS, ROW_ARGMAX, n_rows, n_blocks, K, HAS_X: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """ROW_STATS [3, n_rows] = (LSE(y), entropy(softmax(y)), LSE(x)); ROW_ARGMAX [n_rows] int64."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    plane = n_blocks.to(tl.int64) * n_rows
    m_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    mx_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for j0 in range(0, n_blocks, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        idx = jj.to(tl.int64)[:, None] * n_rows + r[None, :]
        mask = (jj < n_blocks)[:, None] & rmask[None, :]
        m_max = tl.maximum(m_max, tl.max(tl.load(PART + idx, mask=mask, other=float("-inf")), axis=0))
        if HAS_X:
            mx_max = tl.maximum(mx_max, tl.max(tl.load(PART + 3 * plane + idx, mask=mask, other=float("-inf")),
                                               axis=0))
    s_tot = tl.zeros([BLOCK_R], tl.float32)
    t_tot = tl.zeros([BLOCK_R], tl.float32)
    sx_tot = tl.zeros([BLOCK_R], tl.float32)
    argmax = tl.full([BLOCK_R], K, tl.int32)
    for j0 in range(0, n_blocks, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        idx = jj.to(tl.int64)[:, None] * n_rows + r[None, :]
        mask = (jj < n_blocks)[:, None] & rmask[None, :]
        m = tl.load(PART + idx, mask=mask, other=float("-inf"))
        ds, dt = merge_block_stats(m, tl.load(PART + plane + idx, mask=mask, other=0.0),
                                   tl.load(PART + 2 * plane + idx, mask=mask, other=0.0), m_max)
        s_tot += ds
        t_tot += dt
        # The row's argmax: the lowest column among the blocks that reach the row maximum.
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
def _teacher_probs_kernel(D, stride_d, CS, BIAS, CENTER, SHIFT, ROW_STATS, OUT, stride_o, STAT, n_rows, K, temp,
                          inv_temp, inv_n, rows_per_group, HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          MODE: tl.constexpr, WRITE_STAT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT = exp(y - LSE(y)); STAT[g, cols] = this row group's share of the center statistic."""
    j = tl.program_id(0)
    g = tl.program_id(1)
    cols = j * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    cs, a, b_x, b_y = _column_terms(CS, BIAS, CENTER, SHIFT, cols, cmask, inv_temp, HAS_CS, HAS_BIAS, MODE)
    start = g * rows_per_group
    end = tl.minimum(start + rows_per_group, n_rows)
    col_acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
    for p0 in range(start, end, ROWS):
        r = p0 + tl.arange(0, ROWS)
        rmask = r < end
        mask2 = rmask[:, None] & cmask[None, :]
        d = _load_dots(D, stride_d, r, cols, mask2)
        lse_y = tl.load(ROW_STATS + r, mask=rmask, other=0.0)
        probs = tl.exp(d * a[None, :] + b_y[None, :] - lse_y[:, None])
        tl.store(OUT + r.to(tl.int64)[:, None] * stride_o + cols[None, :], probs, mask=mask2)
        if WRITE_STAT:
            if MODE == 1:  # mean_rows(r) = mean_rows(dots) * cs + temp * bias
                col_acc += d  # masked lanes loaded as 0
            if MODE == 2:  # mean_rows(softmax(x))
                lse_x = tl.load(ROW_STATS + 2 * n_rows + r, mask=rmask, other=0.0)
                col_acc += tl.where(mask2, tl.exp(d * a[None, :] + b_x[None, :] - lse_x[:, None]), 0.0)
    if WRITE_STAT:
        stat = tl.sum(col_acc, axis=0) * inv_n
        if MODE == 1:
            stat = stat * cs + tl.where(g == 0, temp * b_x, 0.0)
        tl.store(STAT + g.to(tl.int64) * K + cols, stat, mask=cmask)


@triton.jit
def _column_lse_kernel(D, stride_d, CS, BIAS, ROW_SHIFT, OUT, n_rows, K, inv_temp, rows_per_group,
                       HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[g, k] = logsumexp over the group's rows n of (x[n, k] + ROW_SHIFT[n])."""
    j = tl.program_id(0)
    g = tl.program_id(1)
    cols = j * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    cs, a, b_x, _ = _column_terms(CS, BIAS, CS, CS, cols, cmask, inv_temp, HAS_CS, HAS_BIAS, 0)
    start = g * rows_per_group
    end = tl.minimum(start + rows_per_group, n_rows)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(start, end, ROWS):
        r = p0 + tl.arange(0, ROWS)
        rmask = r < end
        mask2 = rmask[:, None] & cmask[None, :]
        d = _load_dots(D, stride_d, r, cols, mask2)
        v = tl.load(ROW_SHIFT + r, mask=rmask, other=0.0)
        m, s = column_lse_step(m, s, tl.where(mask2, d * a[None, :] + b_x[None, :] + v[:, None], float("-inf")))
    tl.store(OUT + g.to(tl.int64) * K + cols, m + tl.log(tl.where(cmask, s, 1.0)), mask=cmask)


_teacher_partials = tiling.tuned(_teacher_partials_kernel)
_column_lse = tiling.tuned(_column_lse_kernel)


def check_teacher_rows_args(dots, temp, mode, center, col_scale, bias, out) -> None:
    """Shapes, dtypes and devices of a `teacher_rows` call; ValueError naming the argument."""
    check_teacher_inputs(dots, temp, mode, center, None, None)
    if dots.dtype not in DOTS_DTYPES:
        raise ValueError(f"dots must have dtype in {DOTS_DTYPES}, got {dots.dtype}")
    N, K = dots.shape
    if K > 1 and dots.stride(1) != 1:
        raise ValueError(f"dots must have unit column stride (rows may be strided), got strides {dots.stride()}")
    for name, v in (("center", center), ("col_scale", col_scale), ("bias", bias)):
        if v is not None and (v.shape != (K,) or v.dtype != torch.float32 or not v.is_contiguous()
                              or v.device != dots.device):
            raise ValueError(f"{name} must be a contiguous [{K}] float32 tensor on {dots.device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
    if out is not None:
        if out.shape != (N, K) or out.dtype != torch.float32 or out.device != dots.device or (K > 1 and out.stride(1) != 1):
            raise ValueError(f"out must be an [{N}, {K}] float32 tensor with unit column stride on {dots.device}, "
                             f"got {out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")


class _TeacherLaunch:
    """The launches of one `teacher_rows` call, sharing its inputs and plan."""

    def __init__(self, dots, temp, col_scale, bias, plan):
        self.d, self.temp, self.plan = dots, float(temp), plan
        self.N, self.K = dots.shape
        self.f32 = dict(device=dots.device, dtype=torch.float32)
        self.dummy = torch.empty(1, **self.f32)
        self.cs = col_scale if col_scale is not None else self.dummy
        self.bias = bias if bias is not None else self.dummy
        self.flags = dict(HAS_CS=col_scale is not None, HAS_BIAS=bias is not None)

    def row_stats(self, mode_id, center, shift):
        """(ROW_STATS [3, N] = LSE(y), entropy, LSE(x); argmax [N] int64) for y of `mode_id`."""
        p = self.plan
        part = torch.empty(N_PARTIALS, p.n_col_blocks, self.N, **self.f32)
        arg_part = torch.empty(p.n_col_blocks, self.N, device=self.d.device, dtype=torch.int32)
        tiling.launch(_teacher_partials, p.grid, self.d, self.d.stride(0), self.cs, self.bias, center, shift, part,
                      arg_part, self.N, self.K, 1.0 / self.temp, p.rows_per_group, MODE=mode_id,
                      BLOCK_C=p.block_c, **self.flags)
        row_stats = torch.empty(3, self.N, **self.f32)
        row_argmax = torch.empty(self.N, device=self.d.device, dtype=torch.int64)
        _teacher_finish_kernel[(triton.cdiv(self.N, tiling.FINISH_BLOCK_R),)](
            part, arg_part, row_stats, row_argmax, self.N, p.n_col_blocks, self.K, HAS_X=mode_id == MODE_PROB,
            BLOCK_R=tiling.FINISH_BLOCK_R, BLOCK_J=tiling.FINISH_BLOCK_J, num_warps=4)
        return row_stats, row_argmax

    def probs(self, mode_id, center, shift, row_stats, out, with_stat):
        """Write probs to `out`; return the center statistic [K] (None without `with_stat`)."""
        p = self.plan
        stat = torch.empty(p.groups, self.K, **self.f32) if with_stat else self.dummy
        tiling.launch(_teacher_probs_kernel, p.grid, self.d, self.d.stride(0), self.cs, self.bias, center, shift,
                      row_stats, out, out.stride(0), stat, self.N, self.K, self.temp, 1.0 / self.temp, 1.0 / self.N,
                      p.rows_per_group, MODE=mode_id, WRITE_STAT=with_stat, BLOCK_C=p.block_c, **self.flags)
        if not with_stat:
            return None
        return stat[0] if p.groups == 1 else stat.sum(0)

    def column_lse(self, row_shift):
        p = self.plan
        out = torch.empty(p.groups, self.K, **self.f32)
        tiling.launch(_column_lse, p.grid, self.d, self.d.stride(0), self.cs, self.bias, row_shift, out, self.N,
                      self.K, 1.0 / self.temp, p.rows_per_group, BLOCK_C=p.block_c, **self.flags)
        return out[0] if p.groups == 1 else torch.logsumexp(out, dim=0)


def teacher_rows(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None,
                 col_scale: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor | None, *,
                 plan: tiling.ColumnPlan | None = None):
    """The contract's `teacher_rows`: (probs [N, K] fp32, stat [K] fp32 or None, row_entropy [N] fp32,
    row_argmax [N] int64) with `r = dots * col_scale + temp * bias` and the modes of the module docstring.
    `out` may be `dots` itself (fp32 dots): every element is read before it is overwritten. The argmax is
    that of the row's logits y (of probs, unless two probs round to the same fp32 value)."""
    check_teacher_rows_args(dots, temp, mode, center, col_scale, bias, out)
    N, K = dots.shape
    run = _TeacherLaunch(dots, temp, col_scale, bias, plan or tiling.column_plan(N, K, dots.device))
    out = torch.empty(N, K, **run.f32) if out is None else out
    mode_id = _MODES[mode]
    if mode == "sinkhorn":
        final = {}

        def row_lse(a):
            return run.row_stats(MODE_SHIFT, run.dummy, a)[0][0]

        def row_softmax(a):
            final["stats"], final["argmax"] = run.row_stats(MODE_SHIFT, run.dummy, a)
            run.probs(MODE_SHIFT, run.dummy, a, final["stats"], out, False)
            return out

        sinkhorn_knopp(row_lse=row_lse, col_lse=run.column_lse, row_softmax=row_softmax, N=N, K=K, device=dots.device)
        return out, None, final["stats"][1], final["argmax"]
    center_t = center if center is not None else run.dummy
    row_stats, row_argmax = run.row_stats(mode_id, center_t, run.dummy)
    stat = run.probs(mode_id, center_t, run.dummy, row_stats, out, mode in ("logit", "prob"))
    return out, stat, row_stats[1], row_argmax


def teacher_distribution(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None = None,
                         weight_norm: torch.Tensor | None = None, p: int | None = None):
    """Teacher probabilities [N, K] fp32 and the center statistic [K] fp32 (None for none/sinkhorn), the
    public signature of every backend: the vMF column bias of `weight_norm` is computed once ([K], the
    Debye kernel for p >= 32, float64 `dinovmf.vmf` below) and passed to `teacher_rows`."""
    check_teacher_inputs(dots, temp, mode, center, weight_norm, p)
    bias = None
    if weight_norm is not None:
        wn = weight_norm.detach().float().contiguous()
        bias = vmf_column_bias_triton(wn, temp, p) if column_bias_in_kernel(wn, p) else \
            precomputed_column_bias(wn, temp, p).to(dots.device)
    d = dots if dots.dtype in DOTS_DTYPES else dots.float()
    c = center.detach().float().contiguous() if center is not None else None
    probs, stat, _, _ = teacher_rows(d, temp, mode, c, None, bias, None)
    return probs, stat


assert set(_MODES) == set(CENTERING_MODES)
