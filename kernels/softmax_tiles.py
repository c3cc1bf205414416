"""Triton device functions for softmax statistics over column tiles, shared by `ce_rows` and `teacher_rows`.

Both ops cut a [rows, K] matrix into column blocks. Pass 1 writes, for every (row, column block), the
block's exact statistics of the row's logits y:

    m = max_k y_k,   s = sum_k exp(y_k - m),   t = sum_k exp(y_k - m) (y_k - m)    (<= 0)

(one exp per element, the max of the block taken first: no running max, no rescaling per element). A
finish kernel merges a row's blocks with `merge_block_stats`; then

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
def _exp_stats(y, m):
    """(s, t) of a [R, C] tile given its row maxima m [R]."""
    d = y - zero_if_empty(m)[:, None]
    e = tl.exp(d)
    # e == 0 where y == -inf (masked lanes): such a lane adds 0, not 0 * -inf.
    return tl.sum(e, axis=1), tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=1)


@triton.jit
def tile_row_stats(y):
    """Per-row (m, s, t) of a [R, C] tile of logits (-inf on masked lanes)."""
    m = tl.max(y, axis=1)
    s, t = _exp_stats(y, m)
    return m, s, t


@triton.jit
def tile_row_stats_argmax(y):
    """`tile_row_stats` plus the column of each row's maximum within the tile (lowest on ties)."""
    m, idx = tl.max(y, axis=1, return_indices=True)  # ties: the lowest index (the default)
    s, t = _exp_stats(y, m)
    return m, s, t, idx


@triton.jit
def merge_block_stats(m, s, t, m_max):
    """Contributions of blocks (m, s, t) [J, R] to the row totals (S, T) [R] relative to the rows'
    overall maxima m_max [R] (max over all blocks): sums over axis 0 of exp(m - M) s and
    exp(m - M) (t + (m - M) s). Blocks that saw only -inf contribute 0."""
    d = m - zero_if_empty(m_max)[None, :]
    w = tl.exp(d)
    return tl.sum(w * s, axis=0), tl.sum(w * (t + tl.where(s > 0.0, d, 0.0) * s), axis=0)


@triton.jit
def column_lse_step(m, s, y):
    """One [R, C] tile of a per-column online log-sum-exp over rows: (m, s) [C] running max and
    sum of exp(y - m). One exp per element plus one per column for the rescale."""
    m_new = tl.maximum(m, tl.max(y, axis=0))
    ref = zero_if_empty(m_new)
    return m_new, s * tl.exp(m - ref) + tl.sum(tl.exp(y - ref[None, :]), axis=0)
