"""Triton device functions for streaming softmax statistics, shared by `ce_rows` and `teacher_rows`.

Pass 1 of both ops walks a column range of a tile of rows in steps of [ROWS, STEP] and keeps, per row,
a running maximum m (ONE per row and step: a warp holds whole rows, so it is a shuffle reduction, no
barrier) and per-lane sums relative to it:

    s = sum_k exp(y_k - m),   t = sum_k exp(y_k - m) (y_k - m)    (<= 0)

one exp per element; when m grows, the lanes rescale by the per-row scalars exp(m_old - m_new) and
m_old - m_new. The lanes are summed once per range, and a finish kernel merges a row's ranges with
`merge_block_stats`:

    LSE(y) = M + log S,   sum_k softmax(y)_k y_k = M + T / S,   entropy(softmax(y)) = log S - T / S.

Every term of t and of the merged T has the same sign, so T / S (and the entropy) is accurate to a few
ulps even for peaked rows, where `LSE - sum p y` would cancel.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def zero_if_empty(m):
    """The reference point for exp(y - m): m itself, or 0 where the row saw only -inf (then s = t = 0)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_rescale(m, m_step):
    """A row's running max m [R] meets a step's max m_step [R]: returns (m_new, ref, alpha, delta) with
    ref the new reference point, alpha = exp(m - ref) and delta = m - ref (0 before anything was seen)
    to carry sums kept relative to m over to ref."""
    m_new = tl.maximum(m, m_step)
    ref = zero_if_empty(m_new)
    return m_new, ref, tl.exp(m - ref), tl.where(m == float("-inf"), 0.0, m - ref)


@triton.jit
def online_exp_update(s, t, y, mask, ref, alpha, delta):
    """Per-lane (s, t) [R, C] carried to the reference ref [R] and extended by the step y [R, C] (-inf
    on masked lanes). Also returns y - ref, 0 on masked lanes, for sums like Pbar.(l - m)."""
    d = tl.where(mask, y - ref[:, None], 0.0)
    e = tl.where(mask, tl.exp(d), 0.0)
    t = alpha[:, None] * (t + delta[:, None] * s) + e * d
    return alpha[:, None] * s + e, t, d


@triton.jit
def online_exp_sum(s, y, mask, ref, alpha):
    """`online_exp_update` for s alone (a softmax whose entropy is not needed)."""
    e = tl.where(mask, tl.exp(tl.where(mask, y - ref[:, None], 0.0)), 0.0)
    return alpha[:, None] * s + e


@triton.jit
def merge_block_stats(m, s, t, m_max):
    """Contributions of blocks (m, s, t) [J, R] to the row totals (S, T) [R] relative to the rows'
    overall maxima m_max [R] (max over all blocks): sums over axis 0 of exp(m - M) s and
    exp(m - M) (t + (m - M) s). Blocks that saw only -inf contribute 0."""
    d = m - zero_if_empty(m_max)[None, :]
    w = tl.exp(d)
    return tl.sum(w * s, axis=0), tl.sum(w * (t + tl.where(s > 0.0, d, 0.0) * s), axis=0)


@triton.jit
def partials_tile(j0, n_blocks, n_rows, r, rmask, BLOCK_J: tl.constexpr):
    """Offsets [BLOCK_J, R] of ranges j0 .. j0 + BLOCK_J of rows r in a [n_blocks, n_rows] partial plane,
    and their mask."""
    jj = j0 + tl.arange(0, BLOCK_J)
    return jj.to(tl.int64)[:, None] * n_rows + r[None, :], (jj < n_blocks)[:, None] & rmask[None, :]


@triton.jit
def partials_max(PLANE, n_blocks, n_rows, r, rmask, BLOCK_J: tl.constexpr):
    """The rows' maxima over the ranges of a partial plane of maxima: the M of `merge_block_stats`."""
    m_max = tl.full(r.shape, float("-inf"), tl.float32)
    for j0 in range(0, n_blocks, BLOCK_J):
        idx, mask = partials_tile(j0, n_blocks, n_rows, r, rmask, BLOCK_J)
        m_max = tl.maximum(m_max, tl.max(tl.load(PLANE + idx, mask=mask, other=float("-inf")), axis=0))
    return m_max


@triton.jit
def merge_partials(PART, plane, idx, mask, m_max):
    """Load the (m, s, t) planes of a partial buffer at idx and merge them (`merge_block_stats`):
    returns (m, S and T contributions)."""
    m = tl.load(PART + idx, mask=mask, other=float("-inf"))
    ds, dt = merge_block_stats(m, tl.load(PART + plane + idx, mask=mask, other=0.0),
                               tl.load(PART + 2 * plane + idx, mask=mask, other=0.0), m_max)
    return m, ds, dt


@triton.jit
def column_lse_step(m, s, y):
    """One [R, C] tile of a per-column online log-sum-exp over rows: (m, s) [C] running max and
    sum of exp(y - m). One exp per element plus one per column for the rescale. The caller picks
    C so that a column's rows live in one thread (no barrier for the max over rows)."""
    m_new = tl.maximum(m, tl.max(y, axis=0))
    ref = zero_if_empty(m_new)
    return m_new, s * tl.exp(m - ref) + tl.sum(tl.exp(y - ref[None, :]), axis=0)
