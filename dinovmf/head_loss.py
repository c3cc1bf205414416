"""The fused head-to-loss op: from the head's bottleneck rows and prototypes to the DINO / DINO-vMF (or
iBOT same-view) loss, its exact gradients, the teacher's centre statistic and the metrics' by-products,
without ever holding the [N, K] student logits or their gradient (docs/DESIGN.md §2; Liger's fused linear
cross-entropy, adapted to DINO).

Prototypes are either a plain `W` [K, p] or weight-norm parameters `(v, g)` with `w_k = g_k v_k / ||v_k||`.
With (v, g) the GEMMs use `v` itself and the per-prototype column scale `c_k = g_k / (||v_k|| tau)` is
applied inside the row kernel (a [K] vector; no [K, p] W is formed); with W, `c_k = 1 / tau`. Either way
the temperature costs nothing: it is folded into that [K] scale. The vMF term `beta_k = log C_p(||w_k|| /
tau) - log C_p(1 / tau)` is a [K] vector computed once per call by `dinovmf.vmf` (float64 inside, exact
gradient -A_p(kappa) / tau) and added inside the kernel.

On the CPU the three large buffers of a call (teacher dots, student chunk, U) come from
`dinovmf.cpu_memory.kept_empty`: mappings kept between calls and reused once nothing refers to them (a
fresh one costs a page fault per 4 KiB every call).

One call:
  1. teacher: `dots = z_t @ v_t.T` (one GEMM), then the backend's `teacher_rows` kernel writes the teacher
     probabilities over that buffer (fp32) with the centre statistic, row entropy and row argmax;
  2. student, in chunks of rows (`chunk_rows`: the chunk buffer stays within `chunk_bytes`; rows ordered
     image-major inside a chunk so the T teacher rows of an image are reused from cache):
       raw = z_chunk @ v.T                      (GEMM, into the chunk buffer)
       ce_rows(raw, c, beta, ...)               (loss terms, by-products; G * c written over raw)
       dz[chunk]  = (G c) @ v                   (GEMM)
       U         += (G c).T @ z_chunk            (GEMM; U is the returned prototype gradient's buffer)
       dbeta     += column sums of G            (inside ce_rows)
  3. the prototype gradients from U (the [K, p] buffer autograd then keeps as the .grad). With
     M = G^T z / tau = dL/dW through the logits, U_k = c_k tau M_k:
     for W (c_k tau = 1) dW = U plus the bias term dbeta_k dbeta_k/d||w_k|| w_k / ||w_k||; for (v, g)
     (c_k tau = g_k / ||v_k||), as w_k = g_k v^_k gives dL/dv_k = (g_k / ||v_k||)(I - v^_k v^_k^T) M_k and
     dL/dg_k = M_k . v^_k + dbeta_k dbeta_k/dg_k:
       dv_k = U_k - (U_k . v^_k) v^_k,     dg_k = (U_k . v_k) / g_k + dbeta_k dbeta_k/dg_k,
     formed in place in U's buffer with one batched dot product and one axpy over [K, p].

On the CPU in fp32 (the "cpp" backend) the same steps run k-major: the teacher dots and each chunk's logits
are computed transposed, [K, rows] = v @ z^T, the layout MKL writes faster at DINO's head (DESIGN §2), and the
k-major kernels `teacher_cols` / `ce_cols` (csrc/dino_loss_kmajor.cpp) replace `teacher_rows` / `ce_rows`;
rows go in view-major order there (a SIMD lane vector is consecutive images of one view). Both layouts
share one chunk loop (`_student`): each hands back the chunk's gradient as a [K, rows] view that the
dz and U GEMMs read as it is.

Gradients are computed during the forward and scaled by grad_output in backward, as Liger does; under
no_grad (or when nothing requires grad) no gradient work is done. The loss and by-products match
`dinovmf.loss_reference.head_to_loss_reference` (plain autograd), the oracle of the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dinovmf import backends
from dinovmf.centering import teacher_bias
from dinovmf.cpu_memory import kept_empty
from dinovmf.kernels.common import check_mode, check_temp, pair_count, serial_vector_math
from dinovmf.vmf import vmf_column_bias

# The student chunk buffer: at K = 65536 in fp32, 160 rows, i.e. 5 chunks of 154 rows for S*B = 768 (0.2x the
# [768, K] logits). Each chunk's logits GEMM re-packs the [K, p] prototypes inside BLAS, so fewer, larger
# chunks are faster; this budget is the largest that keeps the op's whole peak extra memory under 0.25x the
# logits (the trade-off is measured in bench/results/head_loss.csv, README "Measured results").
DEFAULT_CHUNK_BYTES = 40 * 2 ** 20

# |g_k| below this is treated as this (same sign) in the column scale: dg_k = (U_k . v_k) / g_k stays exact
# for g_k = 0 (a dead plain-DINO prototype), and the logits change by < 2^-64 |z.v| / tau (invisible).
_G_FLOOR = 2.0 ** -64


class HeadLossOutput(NamedTuple):
    """What one call returns. Only `loss` is differentiable; the rest are detached by-products."""
    loss: torch.Tensor  # 0-d
    center_stat: torch.Tensor | None  # [K] local batch statistic for the EMA center (logit/prob), else None
    teacher_probs: torch.Tensor  # [Nt, K] fp32
    teacher_entropy: torch.Tensor  # [Nt] entropy of each teacher row
    teacher_argmax: torch.Tensor  # [Nt] int64
    student_entropy: torch.Tensor  # [N] entropy of each student softmax row (LSE - sum_k softmax_k l_k)
    kappa: torch.Tensor  # [K] student concentrations ||w_k|| / student_temp


def _split_prototypes(prototypes, name: str):
    """(GEMM operand [K, p], g [K] or None) from W or (v, g); ValueError naming `name` otherwise."""
    if isinstance(prototypes, torch.Tensor):
        w, g = prototypes, None
    elif isinstance(prototypes, (tuple, list)) and len(prototypes) == 2:
        w, g = prototypes
        if not isinstance(g, torch.Tensor) or g.dim() != 1 or not g.is_floating_point():
            raise ValueError(f"{name}: g must be a 1-D float tensor [K], got {tuple(getattr(g, 'shape', ()))}")
    else:
        raise ValueError(f"{name} must be a tensor W [K, p] or a pair (v [K, p], g [K]), "
                         f"got {type(prototypes).__name__}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{name} must have a 2-D float [K, p] matrix, got {tuple(getattr(w, 'shape', ()))}")
    if g is not None and g.shape != (w.shape[0],):
        raise ValueError(f"{name}: g must have shape [K]={w.shape[0]}, got {tuple(g.shape)}")
    return w, g


def check_prototypes(prototypes, name: str, K: int, p: int) -> None:
    """ValueError naming `name` unless `prototypes` is W [K, p] or (v [K, p], g [K])."""
    w, _ = _split_prototypes(prototypes, name)
    if tuple(w.shape) != (K, p):
        raise ValueError(f"{name} must be W [K={K}, p={p}] or (v [K, p], g [K]), got a {tuple(w.shape)} matrix")


def check_head_loss_inputs(student_z, teacher_z, student_prototypes, teacher_prototypes, n_global, same_view,
                           row_weight) -> tuple[int, int, int] | None:
    """Validate the op's tensors (ValueError naming the argument); returns (S, T, B) for DINO pairing."""
    w_s, _ = _split_prototypes(student_prototypes, "student_prototypes")
    w_t, _ = _split_prototypes(teacher_prototypes, "teacher_prototypes")
    K, p = w_s.shape
    for name, x in (("student_z", student_z), ("teacher_z", teacher_z)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != p or not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [rows, p={p}], got {tuple(getattr(x, 'shape', ()))}")
    if w_t.shape != (K, p):
        raise ValueError(f"teacher_prototypes must be [K={K}, p={p}] like the student's, got {tuple(w_t.shape)}")
    if student_z.dtype != w_s.dtype or teacher_z.dtype != w_t.dtype:
        raise ValueError(f"each side's z and prototypes must share a dtype: student {student_z.dtype}/{w_s.dtype}, "
                         f"teacher {teacher_z.dtype}/{w_t.dtype}")
    N, Nt = student_z.shape[0], teacher_z.shape[0]
    if same_view:
        if Nt != N or N == 0:
            raise ValueError(f"same-view pairing needs as many teacher_z rows as student_z rows, got {Nt} and {N}")
        if row_weight is not None and (not isinstance(row_weight, torch.Tensor) or row_weight.shape != (N,)):
            raise ValueError(f"row_weight must have shape [N]={N}, got {tuple(getattr(row_weight, 'shape', ()))}")
        return None
    if row_weight is not None:
        raise ValueError("row_weight is only supported with same_view=True")
    if isinstance(n_global, bool) or not isinstance(n_global, int) or n_global < 1:
        raise ValueError(f"n_global must be a positive int, got {n_global!r}")
    if Nt % n_global:
        raise ValueError(f"teacher_z rows ({Nt}) must be n_global={n_global} views of B")
    b = Nt // n_global
    if b == 0 or N % b:
        raise ValueError(f"student_z rows ({N}) must be a multiple of B={b}")
    s = N // b
    if s < 2 or n_global > s:
        raise ValueError(f"DINO pairing needs 2 <= S and n_global <= S, got S={s}, n_global={n_global}")
    return s, n_global, b


def chunk_rows(n_rows: int, K: int, element_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per student chunk: as many as fit a [rows, K] buffer in `chunk_bytes`, then evened out over
    the chunks (768 rows at a 128-row limit: 6 x 128; 770: 7 x 110)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    limit = max(1, chunk_bytes // (K * element_size))
    n_chunks = math.ceil(n_rows / limit)
    return math.ceil(n_rows / n_chunks)


def image_major_order(S: int, B: int, device) -> torch.Tensor:
    """Student rows s*B + b ordered image by image (all S views of image 0, then image 1, ...)."""
    return torch.arange(S * B, device=device).view(S, B).t().reshape(-1)


def _resolve_backend(backend: str, z: torch.Tensor) -> str:
    """The row-kernel backend; float64 inputs run on the reference ("auto" picks it), as kernels are fp32."""
    if z.dtype == torch.float64:
        if backend not in ("auto", "torch"):
            raise ValueError(f"float64 inputs need backend='torch' (the float64 reference); the {backend!r} "
                             "kernels compute in fp32")
        return "torch"
    return backends.resolve_backend(backend, z.device)


@dataclass
class _Plan:
    """One call's settings and its non-differentiable inputs (the teacher side), fixed before the op runs;
    `result` receives the by-products (`_run` writes it once: an autograd Function returns only the loss)."""
    teacher_z: torch.Tensor
    teacher_prototypes: tuple[torch.Tensor, torch.Tensor | None]  # (W or v, g or None)
    teacher_temp: float
    student_temp: float
    centering: str
    center: torch.Tensor | None
    vmf: bool
    same_view: bool
    row_weight: torch.Tensor | None  # same-view row weights, normalised to sum to 1
    grad_scale: float  # d loss / d (sum of row losses)
    S: int  # DINO pairing: student views, teacher views, images (1 each for same-view pairing)
    T: int
    B: int
    backend: str
    chunk_bytes: int
    needs: tuple[bool, bool, bool]  # gradients wanted for (z, W or v, g)
    result: HeadLossOutput | None = None


class _Columns(NamedTuple):
    """The student's per-prototype vectors: l = (z @ w_gemm.T) * scale + beta."""
    scale: torch.Tensor  # c_k = g_k / (||v_k|| tau), or 1 / tau for W
    norm: torch.Tensor  # ||w_k||: |g_k| for (v, g), ||W_k|| for W
    g_eff: torch.Tensor | None  # g with its floor (_G_FLOOR), None for W
    gemm_norm: torch.Tensor  # row norms of the GEMM operand: ||v_k|| or ||W_k||


class _VmfBias(NamedTuple):
    """The vMF column bias beta [K] and what differentiates it: `value64` = beta(leaf) in float64 with its graph,
    `leaf` = |g| for (v, g) or ||W|| for W, `value` = beta in the op's vector dtype."""
    value: torch.Tensor
    value64: torch.Tensor
    leaf: torch.Tensor


def _vector_dtype(dtype: torch.dtype) -> torch.dtype:
    """[K] vectors and statistics: float64 on the float64 (reference-backend) path, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _column_scale(w, g, temp: float, vdt) -> _Columns:
    with torch.no_grad():
        w_norm = torch.linalg.vector_norm(w.detach(), dim=1, dtype=vdt)  # [K, p]: all threads
    with torch.no_grad(), serial_vector_math(w.device):
        if g is None:
            return _Columns(torch.full_like(w_norm, 1.0 / temp), w_norm, None, w_norm)
        g_eff = g.detach().to(vdt)
        g_eff = torch.where(g_eff.abs() < _G_FLOOR, torch.where(g_eff < 0, -_G_FLOOR, _G_FLOOR), g_eff)
        return _Columns(g_eff / (w_norm * temp), g.detach().to(vdt).abs(), g_eff, w_norm)


def _vmf_bias(g, cols: _Columns, temp: float, p: int, requires_grad: bool, vdt) -> _VmfBias:
    """beta_k = log C_p(||w_k|| / tau) - log C_p(1 / tau) (dinovmf.vmf, float64 inside)."""
    with serial_vector_math(cols.scale.device):
        leaf = (g.detach().double() if g is not None else cols.norm.double()).requires_grad_(requires_grad)
        with torch.enable_grad():
            value64 = vmf_column_bias(leaf.abs() if g is not None else leaf, temp, p)
        return _VmfBias(value64.detach().to(vdt), value64, leaf)


def weight_norm_backward_(u: torch.Tensor, v: torch.Tensor, v_norm: torch.Tensor) -> torch.Tensor:
    """In place: u_k <- u_k - (u_k . v_k / ||v_k||^2) v_k; returns u_k . v_k (before the update), [K].

    With u = (g / ||v||) dL/dw (what the op accumulates), the new u is dL/dv of w = g v / ||v|| and
    (u . v) / g is dL/dg through w. One pass over [K, p] in C++ for float32 CPU tensors, else two torch ops.
    """
    if u.device.type == "cpu" and u.dtype == torch.float32 and v.dtype == torch.float32:
        from dinovmf._ext import ExtensionUnavailable, weight_norm_backward_cpp
        try:
            return weight_norm_backward_cpp(u, v, v_norm)
        except ExtensionUnavailable:
            pass
    v = v.to(u.dtype)
    u_dot_v = torch.bmm(u.unsqueeze(1), v.unsqueeze(2)).view(-1)
    u.addcmul_(v, (-u_dot_v / v_norm.to(u.dtype).square()).unsqueeze(1))
    return u_dot_v


def _teacher_columns(plan: _Plan):
    """The teacher's [K] column scale (for (v, g)) and vMF bias (or None each)."""
    w_t, g_t = plan.teacher_prototypes
    vdt = _vector_dtype(plan.teacher_z.dtype)
    with torch.no_grad():
        w_norm = torch.linalg.vector_norm(w_t.detach(), dim=1, dtype=vdt) if (g_t is not None or plan.vmf) else None
        with serial_vector_math(w_t.device):
            col_scale = norm = None
            if g_t is not None:
                norm = g_t.detach().to(vdt).abs()
                col_scale = g_t.detach().to(vdt) / w_norm
            elif plan.vmf:
                norm = w_norm
            bias = teacher_bias(norm, plan.teacher_temp, w_t.shape[1]) if plan.vmf else None
    return col_scale, bias


def _teacher(plan: _Plan, teacher_rows):
    """Teacher probabilities over the teacher GEMM's buffer, and the kernel's by-products."""
    w_t, _ = plan.teacher_prototypes
    col_scale, bias = _teacher_columns(plan)
    with torch.no_grad():
        zt = plan.teacher_z.detach()
        dots = torch.mm(zt, w_t.detach().t(), out=kept_empty(zt.shape[0], w_t.shape[0], dtype=zt.dtype,
                                                              device=zt.device))
        out = dots if dots.dtype == torch.float32 else None  # probabilities in place over the dots
        return teacher_rows(dots, plan.teacher_temp, plan.centering, plan.center, col_scale, bias, out)


def _padded_rows(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """x [n, p] with zero rows appended up to a multiple of `lanes` (x itself when it is one)."""
    pad = -x.shape[0] % lanes
    return x if pad == 0 else torch.cat([x, x.new_zeros(pad, x.shape[1])])


def _teacher_kmajor(plan: _Plan, lanes: int):
    """`_teacher` k-major (csrc/dino_loss_kmajor.cpp): probabilities [K, Nt padded] over the dots W_t z_t^T."""
    from dinovmf._ext import teacher_cols_cpp
    w_t, _ = plan.teacher_prototypes
    col_scale, bias = _teacher_columns(plan)
    with torch.no_grad():
        zt = _padded_rows(plan.teacher_z.detach(), lanes)
        dots_t = torch.mm(w_t.detach(), zt.t(), out=kept_empty(w_t.shape[0], zt.shape[0], dtype=zt.dtype))
        return teacher_cols_cpp(dots_t, plan.teacher_z.shape[0], plan.teacher_temp, plan.centering, plan.center,
                                col_scale, bias)


def _uses_kmajor(plan: _Plan, z: torch.Tensor) -> bool:
    """fp32 on the C++ backend runs k-major (csrc/dino_loss_kmajor.cpp: the faster GEMM layout on the CPU)."""
    return plan.backend == "cpp" and z.dtype == torch.float32


class _Chunks(NamedTuple):
    """What the student loop writes: row stats [4, N], dz [N, p] and U [K, p] (None when not needed), and
    the [K] bias-gradient accumulator dbeta (or None)."""
    stats: torch.Tensor
    dz: torch.Tensor | None
    u: torch.Tensor | None
    dbeta: torch.Tensor | None


class _RowMajorChunks:
    """A chunk's [rows, K] logits through the backend's `ce_rows`; rows image-major (the T teacher rows of
    an image are reused from cache), or in order for same-view pairing."""

    def __init__(self, plan: _Plan, z: torch.Tensor, K: int, rows: int, probs: torch.Tensor):
        N = z.shape[0]
        self.order = torch.arange(N, device=z.device) if plan.same_view else image_major_order(plan.S, plan.B, z.device)
        self.rows, self.buf = rows, kept_empty(rows, K, dtype=z.dtype, device=z.device)
        self.ce_rows, self.probs = backends.ce_rows_impl(plan.backend), probs

    def __call__(self, plan, idx, z_c, w_gemm, cols, bias, weight_c, need_grad, dbeta):
        raw = self.buf[:idx.numel()]
        torch.mm(z_c, w_gemm.t(), out=raw)
        stats = self.ce_rows(raw, cols.scale, bias, self.probs, idx, plan.B, plan.T, plan.same_view, weight_c,
                             plan.grad_scale, raw if need_grad else None, dbeta)
        return stats, raw.t()


class _KMajorChunks:
    """A chunk's logits k-major (fp32, CPU): raw^T = v z_c^T [K, C] (C padded to the SIMD lanes with zero rows)
    through `ce_cols` in place. Rows in view-major order, so a lane vector is consecutive images of one view
    and reads its teacher terms contiguously."""

    def __init__(self, plan: _Plan, z: torch.Tensor, K: int, rows: int, probs_t: torch.Tensor, lanes: int):
        from dinovmf._ext import ce_cols_cpp
        self.order, self.rows = torch.arange(z.shape[0], device=z.device), rows
        self.flat = kept_empty(-(-rows // lanes) * lanes * K, dtype=z.dtype, device=z.device)  # [K, rows padded]
        self.ce_cols, self.probs_t, self.lanes, self.K = ce_cols_cpp, probs_t, lanes, K

    def __call__(self, plan, idx, z_c, w_gemm, cols, bias, weight_c, need_grad, dbeta):
        c = idx.numel()
        z_pad = _padded_rows(z_c, self.lanes)
        raw_t = self.flat[:self.K * z_pad.shape[0]].view(self.K, z_pad.shape[0])
        torch.mm(w_gemm, z_pad.t(), out=raw_t)
        stats = self.ce_cols(raw_t, cols.scale, bias, self.probs_t, int(idx[0]), c, plan.B, plan.T, plan.same_view,
                             weight_c, plan.grad_scale, need_grad, dbeta)
        return stats, raw_t[:, :c]


def _student(plan: _Plan, z, w_gemm, cols: _Columns, bias, out: _Chunks, need_grad: bool, chunk) -> None:
    """The student rows in chunks of `chunk.rows` (module docstring, step 2), whatever the layout: `chunk`
    computes a chunk's row stats and its gradient G * c as a [K, rows] view (`_RowMajorChunks` /
    `_KMajorChunks`); then
    dz = (G c) @ v and U += (G c)^T z_c read that view as it is."""
    rows = chunk.rows
    zd = z.detach()
    for r0 in range(0, z.shape[0], rows):
        idx = chunk.order[r0:r0 + rows]
        z_c = zd.index_select(0, idx)
        weight_c = None if plan.row_weight is None else plan.row_weight.index_select(0, idx)
        stats, g_kc = chunk(plan, idx, z_c, w_gemm, cols, bias, weight_c, need_grad, out.dbeta)
        out.stats[:, idx] = stats.to(out.stats.dtype)
        if out.dz is not None:
            out.dz[idx] = torch.mm(g_kc.t(), w_gemm)
        if out.u is not None:
            if g_kc.dtype != out.u.dtype:  # bf16/fp16 chunks: each chunk's product rounded once, summed in fp32
                (out.u.copy_ if r0 == 0 else out.u.add_)(torch.mm(g_kc, z_c))
            elif r0 == 0:
                torch.mm(g_kc, z_c, out=out.u)
            else:
                out.u.addmm_(g_kc, z_c)


def _run(plan: _Plan, z, w, g):
    """One call of the op; returns (loss, (dz, dw, dg)) and stores the by-products in `plan.result`."""
    need_dz, need_dw, need_dg = plan.needs
    K, p = w.shape
    N = z.shape[0]
    vdt = _vector_dtype(z.dtype)
    tau = plan.student_temp
    rows = chunk_rows(N, K, z.element_size(), plan.chunk_bytes)
    if _uses_kmajor(plan, z):
        from dinovmf._ext import kmajor_lanes
        lanes = kmajor_lanes()
        probs_t, stat, t_entropy, t_argmax = _teacher_kmajor(plan, lanes)
        probs = probs_t[:, :plan.teacher_z.shape[0]].t()  # [Nt, K], a view of the k-major probabilities
        chunk = _KMajorChunks(plan, z, K, rows, probs_t, lanes)
    else:
        probs, stat, t_entropy, t_argmax = _teacher(plan, backends.teacher_rows_impl(plan.backend))
        chunk = _RowMajorChunks(plan, z, K, rows, probs)
    cols = _column_scale(w, g, tau, vdt)
    need_grad = any(plan.needs)
    learns = need_dw or need_dg
    bias = _vmf_bias(g, cols, tau, p, learns, vdt) if plan.vmf else None
    acc_dt = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    out = _Chunks(stats=torch.empty(4, N, dtype=vdt, device=z.device),
                  dz=torch.empty_like(z) if need_dz else None,
                  u=kept_empty(K, p, dtype=acc_dt, device=z.device) if learns else None,
                  dbeta=torch.zeros(K, dtype=vdt, device=z.device) if plan.vmf and learns else None)
    _student(plan, z, w.detach(), cols, None if bias is None else bias.value, out, need_grad, chunk)
    stats = out.stats
    weighted = stats[0] if plan.row_weight is None else stats[0] * plan.row_weight.to(vdt)
    loss = weighted.sum() * plan.grad_scale
    plan.result = HeadLossOutput(loss.detach(), stat, probs, t_entropy, t_argmax, (stats[1] - stats[3]).detach(),
                                 cols.norm / tau)
    dw, dg = _prototype_gradients(out.u, w, g, cols=cols, bias=bias, dbeta=out.dbeta, need_dw=need_dw,
                                  need_dg=need_dg, vdt=vdt)
    return loss.to(torch.float64 if z.dtype == torch.float64 else torch.float32), (out.dz, dw, dg)


def _prototype_gradients(u, w, g, *, cols: _Columns, bias: _VmfBias | None, dbeta, need_dw: bool, need_dg: bool,
                         vdt):
    """(dL/dW or dL/dv, dL/dg) from U (the accumulated (G c)^T z, a buffer that becomes dW or dv in place)
    and the bias gradient dbeta (module docstring, step 3)."""
    if u is None:
        return None, None
    w = w.detach()
    d_bias = None
    if dbeta is not None:
        with serial_vector_math(w.device):
            (d_bias,) = torch.autograd.grad(bias.value64, bias.leaf, dbeta.to(torch.float64))
    if g is None:  # W: U is dL/dW through the logits; the bias adds dbeta_k dbeta_k/d||w_k|| w_k/||w_k||
        if d_bias is not None:
            u.addcmul_(w.to(u.dtype), (d_bias / bias.leaf.detach()).to(u.dtype).unsqueeze(1))
        return u.to(w.dtype), None
    u_dot_v = weight_norm_backward_(u, w, cols.gemm_norm)  # u becomes dL/dv in place; dL/dg from the dots
    dg = None
    if need_dg:
        with serial_vector_math(w.device):
            dg = u_dot_v.to(vdt) / cols.g_eff
            if d_bias is not None:
                dg = dg + d_bias.to(vdt)
            dg = dg.to(g.dtype)
    return (u.to(w.dtype) if need_dw else None), dg


def hand_over_scaled(grads, grad_loss: torch.Tensor) -> tuple:
    """The gradients a loss computed in its forward, scaled in place by grad_output, for a Function's
    backward to return (autograd then takes the buffers without a copy). Scaling by exactly 1 (the usual
    case) would be a pass over [K, p] for nothing; the check is a host read, so it is made on the CPU only."""
    if grads is None:
        raise RuntimeError("this fused loss computes its gradients once, in forward: backward through it a "
                           "second time (retain_graph=True) is not supported")
    if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
        for x in grads:
            if x is not None:
                x.mul_(grad_loss.to(x.dtype))
    return tuple(grads)


class _HeadToLoss(torch.autograd.Function):
    """Gradients computed in forward; backward scales them by grad_output (in place) and hands them over."""

    @staticmethod
    def forward(ctx, z, w, g, plan):
        loss, grads = _run(plan, z, w, g)
        ctx.grads = grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # hand the buffers over to autograd (no copy, no second backward)
        return (*hand_over_scaled(grads, grad_loss), None)


def head_to_loss(student_z: torch.Tensor, teacher_z: torch.Tensor, student_prototypes, teacher_prototypes, *,
                 student_temp: float, teacher_temp: float, centering: str = "logit",
                 center: torch.Tensor | None = None, vmf: bool = True, n_global: int | None = None,
                 same_view: bool = False, row_weight: torch.Tensor | None = None, backend: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> HeadLossOutput:
    """The DINO(-vMF) loss from head features, with its gradients, in chunks of rows (module docstring).

    Args:
        student_z [N, p]: student bottleneck rows (unit vectors), view-major (row s*B + b) for DINO pairing.
        teacher_z [Nt, p]: teacher rows: T*B view-major (DINO pairing), or N rows (same_view).
        student_prototypes, teacher_prototypes: W [K, p], or the weight-norm pair (v [K, p], g [K]) with
            w_k = g_k v_k / ||v_k|| (DINOHead's parameters: no W is formed).
        student_temp, teacher_temp: tau_s, tau_t.
        centering, center: the teacher's mode (`dinovmf.centering`) and its [K] center (logit / prob).
        vmf: add the vMF column bias (DINO-vMF) on both sides.
        n_global: T, the teacher views (DINO pairing: teacher view t is student view t; every (t, s != t)
            pair counts, loss = mean over pairs and images).
        same_view, row_weight: iBOT's patch pairing instead: student row i against teacher row i, loss =
            sum_i w_i ce_i / sum_i w_i (w = 1 without row_weight).
        backend: "auto", "torch", "cpp" or "triton" (the row kernels; `dinovmf.backends`).
        chunk_bytes: memory budget of the student chunk buffer ([rows, K] in z's dtype).

    Returns a `HeadLossOutput`: the 0-d loss (fp32; float64 for float64 inputs) differentiable w.r.t.
    student_z and the student prototypes (W, or v and g), and detached by-products. Both sides run
    without autocast; z and prototypes must share a dtype per side (fp32, bf16, fp16, or float64 with
    the torch backend).
    """
    layout = check_head_loss_inputs(student_z, teacher_z, student_prototypes, teacher_prototypes, n_global,
                                    same_view, row_weight)
    check_mode(centering)
    student_temp, teacher_temp = check_temp(student_temp, "student_temp"), check_temp(teacher_temp, "teacher_temp")
    name = _resolve_backend(backend, student_z)
    w, g = _split_prototypes(student_prototypes, "student_prototypes")
    N = student_z.shape[0]
    if same_view:
        S = T = B = 1
        if row_weight is None:
            grad_scale, weight = 1.0 / N, None
        else:
            weight = (row_weight.detach() / row_weight.detach().sum()).to(_vector_dtype(student_z.dtype))
            grad_scale = 1.0
    else:
        S, T, B = layout
        grad_scale, weight = 1.0 / (pair_count(S, T) * B), None
    grad_on = torch.is_grad_enabled()
    plan = _Plan(teacher_z=teacher_z, teacher_prototypes=_split_prototypes(teacher_prototypes, "teacher_prototypes"),
                 teacher_temp=teacher_temp, student_temp=student_temp, centering=centering,
                 center=None if center is None else center.detach(), vmf=bool(vmf), same_view=bool(same_view),
                 row_weight=weight, grad_scale=grad_scale, S=S, T=T, B=B, backend=name, chunk_bytes=chunk_bytes,
                 needs=(grad_on and student_z.requires_grad, grad_on and w.requires_grad,
                        grad_on and g is not None and g.requires_grad))
    with torch.autocast(student_z.device.type, enabled=False):
        if any(plan.needs):
            loss = _HeadToLoss.apply(student_z, w, g, plan)
        else:
            loss, _ = _run(plan, student_z, w, g)
    return plan.result._replace(loss=loss)


__all__ = ["DEFAULT_CHUNK_BYTES", "HeadLossOutput", "check_head_loss_inputs", "check_prototypes", "chunk_rows",
           "hand_over_scaled", "head_to_loss", "image_major_order"]
