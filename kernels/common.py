"""Host-side pieces shared by every fused backend (torch reference, C++, Triton): the centering modes,
input checks of the two row kernels (`ce_rows`, `teacher_rows`, see docs/INTERFACES.md), the DINO pairing
counts, the per-column vectors a teacher kernel applies, and the Sinkhorn-Knopp driver.

Nothing here imports triton or a compiled extension, so the C++ backend works without either.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

CENTERING_MODES = ("logit", "prob", "none", "sinkhorn")
SINKHORN_ITERATIONS = 3  # DINOv2's default; the contract fixes it.
# Teacher kernels' centre statistic: none, the row mean of the output logits y, or the row mean of
# normalise_rows(softmax(y) * stat_weight) (see `teacher_column_terms`).
STAT_NONE, STAT_MEAN_LOGITS, STAT_MEAN_REWEIGHTED = 0, 1, 2


def check_mode(mode) -> None:
    """ValueError unless `mode` is one of CENTERING_MODES."""
    if mode not in CENTERING_MODES:
        raise ValueError(f"mode must be one of {CENTERING_MODES}, got {mode!r}")


def check_temp(temp, name: str = "temp") -> float:
    """The temperature as a float; ValueError naming `name` unless it is a finite number > 0."""
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {temp!r}")
    return float(temp)


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
    if not isinstance(dots, torch.Tensor) or dots.dim() != 2 or dots.shape[0] < 1 or dots.shape[1] < 1:
        raise ValueError(f"dots must be a non-empty [N, K] tensor, got shape {tuple(getattr(dots, 'shape', ()))}")
    if not dots.is_floating_point():
        raise ValueError(f"dots must be a floating-point tensor, got {dots.dtype}")
    check_temp(temp)
    check_mode(mode)
    K = dots.shape[1]
    _check_center(center, mode, K)
    if weight_norm is not None:
        if weight_norm.shape != (K,):
            raise ValueError(f"weight_norm must have shape [K]={K}, got {tuple(weight_norm.shape)}")
        if p is None or int(p) != p or p < 2:
            raise ValueError(f"p (the bottleneck dim) must be an integer >= 2 with weight_norm, got {p!r}")


def _check_center(center, mode: str, K: int) -> None:
    if mode in ("logit", "prob"):
        if center is None:
            raise ValueError(f"center is required for mode {mode!r}: a [K]={K} tensor")
        if not isinstance(center, torch.Tensor) or center.shape != (K,):
            raise ValueError(f"center must have shape [K]={K}, got {tuple(getattr(center, 'shape', ()))}")


class KernelLayout:
    """What a row kernel accepts beyond the contract's minimum (one set of checks, parameterised).

    The contract (torch reference, C++): contiguous float matrices, float [K] / [c] vectors (converted by
    the backend). A Triton kernel reads rows through their stride (unit column stride suffices) and takes
    its vectors as they are: `strided_rows=True`, `dtypes` = the matrix dtypes it computes, and
    float32 contiguous vectors and teacher probabilities (`float32_vectors`).
    """

    def __init__(self, strided_rows: bool = False, dtypes: tuple | None = None, float32_vectors: bool = False):
        self.strided_rows, self.dtypes, self.float32_vectors = strided_rows, dtypes, float32_vectors

    def check_matrix(self, name: str, x, K: int | None = None, dtypes: tuple | None = None) -> None:
        """ValueError naming `name` unless x is a 2-D float [*, K] tensor laid out as this kernel reads it."""
        dtypes = dtypes or self.dtypes
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor, got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if dtypes is not None and x.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype in {dtypes}, got {x.dtype}")
        if K is not None and x.shape[1] != K:
            raise ValueError(f"{name} must have K={K} columns, got shape {tuple(x.shape)}")
        if self.strided_rows:
            if x.shape[1] > 1 and x.stride(1) != 1:
                raise ValueError(f"{name} must have unit column stride (rows may be strided), got strides "
                                 f"{x.stride()}")
        elif not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    def check_vector(self, name: str, x, n: int, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """ValueError naming `name` unless x is None or an [n] vector on `device` (float32 and contiguous
        for a kernel that takes vectors as they are; `dtype` for non-float vectors such as row_index)."""
        if x is None:
            return
        dtype = dtype or (torch.float32 if self.float32_vectors else None)
        ok = isinstance(x, torch.Tensor) and x.shape == (n,)
        if ok and dtype is not None:
            ok = x.dtype == dtype and (x.is_contiguous() or not self.float32_vectors)
        elif ok:
            ok = x.is_floating_point()
        if not ok:
            raise ValueError(f"{name} must be a {'contiguous ' if self.float32_vectors else ''}"
                             f"{dtype or 'float'} tensor of shape [{n}], got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, the rows on {device}")


CONTRACT_LAYOUT = KernelLayout()


def check_ce_rows_inputs(logits, col_scale, bias, teacher_probs, row_index, B: int, T: int, same_view: bool,
                         row_weight, grad_out, col_grad_sum, layout: KernelLayout = CONTRACT_LAYOUT) -> None:
    """Validate the arguments of a `ce_rows` kernel (docs/INTERFACES.md, Backends) as `layout` reads them;
    ValueError naming the argument. Values of `row_index` are not read here (that would be a device
    sync); kernels bound-check them where that is free."""
    layout.check_matrix("logits", logits)
    c, K = logits.shape
    dev = logits.device
    layout.check_vector("col_scale", col_scale, K, dev)
    layout.check_vector("bias", bias, K, dev)
    layout.check_matrix("teacher_probs", teacher_probs, K, (torch.float32,) if layout.float32_vectors else None)
    if teacher_probs.device != dev:
        raise ValueError(f"teacher_probs is on {teacher_probs.device}, logits on {dev}")
    layout.check_vector("row_index", row_index, c, dev, torch.int64)
    for name, v in (("B", B), ("T", T)):
        if not same_view and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int for DINO pairing, got {v!r}")
    if not same_view and teacher_probs.shape[0] != T * B:
        raise ValueError(f"teacher_probs must have T*B={T * B} rows for DINO pairing, got {teacher_probs.shape[0]}")
    layout.check_vector("row_weight", row_weight, c, dev)
    if grad_out is not None:
        layout.check_matrix("grad_out", grad_out, K, (logits.dtype,))
        if grad_out.shape[0] != c or grad_out.device != dev:
            raise ValueError(f"grad_out must be a {logits.dtype} tensor shaped like logits {tuple(logits.shape)} "
                             f"on {dev}, got {tuple(grad_out.shape)} on {grad_out.device}")
    # float32; float64 also with float64 logits on the contract (the reference backend's float64 path).
    float64_ok = logits.dtype == torch.float64 and not layout.float32_vectors
    sum_dtype = torch.float64 if float64_ok and getattr(col_grad_sum, "dtype", None) == torch.float64 else torch.float32
    layout.check_vector("col_grad_sum", col_grad_sum, K, dev, sum_dtype)


def check_teacher_rows_inputs(dots, temp, mode, center, col_scale, bias, out,
                              layout: KernelLayout = CONTRACT_LAYOUT) -> None:
    """Validate the arguments of a `teacher_rows` kernel as `layout` reads them; ValueError naming the
    argument."""
    layout.check_matrix("dots", dots)
    if dots.shape[0] < 1 or dots.shape[1] < 1:
        raise ValueError(f"dots must be a non-empty [N, K] tensor, got {tuple(dots.shape)}")
    check_temp(temp)
    check_mode(mode)
    K = dots.shape[1]
    _check_center(center, mode, K)
    for name, v in (("center", center), ("col_scale", col_scale), ("bias", bias)):
        layout.check_vector(name, v, K, dots.device)
    if out is not None:
        layout.check_matrix("out", out, K, (torch.float32,) if layout.float32_vectors else None)
        if out.shape != dots.shape or out.device != dots.device:
            raise ValueError(f"out must be shaped like dots {tuple(dots.shape)} on {dots.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
        if out.data_ptr() == dots.data_ptr() and out.dtype != dots.dtype:
            raise ValueError("out may alias dots only when both have the same dtype")


def check_visit_inner(visit_inner, c: int) -> None:
    """The `ce_rows` visiting-order hint: a positive int dividing the chunk's row count c (ValueError)."""
    if isinstance(visit_inner, bool) or not isinstance(visit_inner, int) or visit_inner < 1 or c % visit_inner:
        raise ValueError(f"visit_inner must be a positive int dividing the {c} rows, got {visit_inner!r}")


def teacher_column_terms(temp: float, mode: str, center: torch.Tensor | None, col_scale: torch.Tensor | None,
                         bias: torch.Tensor | None, K: int, device: torch.device):
    """The per-column vectors of a teacher row pass, so that the output logits are `y = dots * a + b`:

    * a = col_scale / temp;  b = bias + shift, with shift = -center/temp (logit), -log(center) (prob), 0 else;
    * the centre statistic: `logit` needs mean_rows(r), r = temp * y + center, so the kernel accumulates
      mean_rows(y) (STAT_MEAN_LOGITS) and `finish_teacher_stat` maps it back; `prob` needs
      mean_rows(softmax(r / temp)) = mean_rows(normalise_rows(softmax(y) * center)), accumulated with the
      weight `center / max(center)` (<= 1: no overflow) from the same exponentials (STAT_MEAN_REWEIGHTED).

    Returns float32 (a [K], b [K], stat_kind, stat_weight [K] or None). Sinkhorn uses `b` as the base
    that its per-iteration column offsets are added to.
    """
    f32 = dict(device=device, dtype=torch.float32)
    a = (col_scale.float() / temp) if col_scale is not None else torch.full((K,), 1.0 / temp, **f32)
    b = bias.float().clone() if bias is not None else torch.zeros(K, **f32)
    stat_kind, stat_weight = STAT_NONE, None
    if mode == "logit":
        b.sub_(center.float(), alpha=1.0 / temp)
        stat_kind = STAT_MEAN_LOGITS
    elif mode == "prob":
        c = center.float()
        b.sub_(torch.log(c))
        stat_kind, stat_weight = STAT_MEAN_REWEIGHTED, (c / c.max()).contiguous()
    return a.contiguous(), b.contiguous(), stat_kind, stat_weight


def finish_teacher_stat(stat: torch.Tensor | None, temp: float, mode: str, center: torch.Tensor | None):
    """The centre statistic from what a kernel accumulated (see `teacher_column_terms`); None if no stat."""
    if mode == "logit":
        return stat.mul_(temp).add_(center.float())
    return stat if mode == "prob" else None


@contextlib.contextmanager
def serial_vector_math(device: torch.device):
    """One intra-op thread for [K]-vector host math (vMF terms, column scales, metrics) on the CPU.

    Each of these ~100 small ops is microseconds of work, but at K >= 32768 ATen opens a parallel region
    for it, and waking the other thread can cost far more than the work (on a shared, oversubscribed box,
    tens of times more: the vMF terms alone then cost seconds per step). Switching the count is nearly
    free; GEMMs, [K, p] passes and the row kernels stay outside and use every thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
                   row_softmax: Callable[[torch.Tensor], object], N: int, K: int,
                   device: torch.device, iterations: int = SINKHORN_ITERATIONS):
    """DINOv2's Sinkhorn-Knopp on Q = exp(x) [N, K] in log space, backend kernels doing the passes.

    DINOv2 alternates `Q /= Q.sum(rows) * K` (per prototype) and `Q /= Q.sum(cols) * B` (per sample),
    starting from Q = exp(x) / sum(Q). Scalar factors cancel, so in log space with per-prototype
    offsets `a` and per-sample offsets `v` this is, for each iteration,
        a_k = -logsumexp_b(x_bk + v_b),   v_b = -logsumexp_k(x_bk + a_k),
    from v = 0, and the result is softmax_k(x_bk + a_k). The three callables each read x once:
    `col_lse(v) -> [K]`, `row_lse(a) -> [N]` and `row_softmax(a)` (whose result is returned as is). The
    column log-sum-exp is reduced over ranks, so the iteration runs over the global batch. The one
    Sinkhorn-Knopp of the package: every backend passes its kernels, the reference torch reductions
    (`dinovmf.centering.sinkhorn_reference`).
    """
    v = torch.zeros(N, device=device, dtype=torch.float32)
    a = None
    for it in range(iterations):
        a = -allreduce_logsumexp_(col_lse(v))
        if it + 1 < iterations:
            v = -row_lse(a)
    return row_softmax(a)
