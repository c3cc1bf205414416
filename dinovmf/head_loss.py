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
are computed transposed, [K, rows] = v @ z^T, the layout MKL writes ~1.4x faster at DINO's head, and the
k-major kernels `teacher_cols` / `ce_cols` (csrc/dino_loss_kmajor.cpp) replace `teacher_rows` / `ce_rows`;
rows go in view-major order there (a SIMD lane vector is consecutive images of one view). Measured at
the step benchmark's sizes (S=8, T=2, B=32, K=65536, p=256, fwd + bwd, 2 threads, 2-core EPYC VM):
386 ms row-major, 326 ms k-major (medians of 10 alternating calls).

Gradients are computed during the forward and scaled by grad_output in backward, as Liger does; under
no_grad (or when nothing requires grad) no gradient work is done. The loss and by-products match
`dinovmf.loss_reference.head_to_loss_reference` (plain autograd), the oracle of the tests.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dinovmf import backends
from dinovmf.centering import teacher_bias
from dinovmf.cpu_memory import kept_empty
from dinovmf.kernels.common import check_mode, check_temp, pair_count, serial_vector_math
from dinovmf.vmf import vmf_column_bias

# The student chunk buffer: at K = 65536 in fp32, 160 rows, i.e. 5 chunks of 154 rows for S*B = 768 (0.2x the
# [768, K] logits). Each chunk's logits GEMM re-packs the [K, p] prototypes inside BLAS, so fewer, larger
# chunks are faster (measured: 6 chunks cost ~+25% on that GEMM vs one full-size call); this budget keeps
# the op's whole peak extra memory under 0.25x the logits.
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
        raise ValueError(f"{name} must be a tensor W [K, p] or a pair (v [K, p], g [K]), got {type(prototypes).__name__}")
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


class _Plan:
    """The non-differentiable half of one call (teacher tensors, settings) and, after it, the by-products."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.result = None


def _vector_dtype(dtype: torch.dtype) -> torch.dtype:
    """[K] vectors and statistics: float64 on the float64 (reference-backend) path, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _column_scale(w, g, temp: float, vdt):
    """(c [K] with l = (z @ w.T) * c + beta, the prototype norms ||w_k||, g with its floor or None, and
    the row norms of the GEMM operand w: ||v_k|| or ||W_k||)."""
    with torch.no_grad():
        w_norm = torch.linalg.vector_norm(w.detach(), dim=1, dtype=vdt)  # [K, p]: all threads
    with torch.no_grad(), serial_vector_math(w.device):
        if g is None:
            return torch.full_like(w_norm, 1.0 / temp), w_norm, None, w_norm
        g_eff = g.detach().to(vdt)
        g_eff = torch.where(g_eff.abs() < _G_FLOOR, torch.where(g_eff < 0, -_G_FLOOR, _G_FLOOR), g_eff)
        return g_eff / (w_norm * temp), g.detach().to(vdt).abs(), g_eff, w_norm


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


def _teacher_columns(plan):
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


def _teacher(plan, teacher_rows):
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


def _teacher_kmajor(plan, lanes: int):
    """`_teacher` k-major (csrc/dino_loss_kmajor.cpp): probabilities [K, Nt padded] over the dots W_t z_t^T."""
    from dinovmf._ext import teacher_cols_cpp
    w_t, _ = plan.teacher_prototypes
    col_scale, bias = _teacher_columns(plan)
    with torch.no_grad():
        zt = _padded_rows(plan.teacher_z.detach(), lanes)
        dots_t = torch.mm(w_t.detach(), zt.t(), out=kept_empty(w_t.shape[0], zt.shape[0], dtype=zt.dtype))
        return teacher_cols_cpp(dots_t, plan.teacher_z.shape[0], plan.teacher_temp, plan.centering, plan.center,
                                col_scale, bias)


def _uses_kmajor(plan, z: torch.Tensor) -> bool:
    """fp32 on the C++ backend runs k-major (csrc/dino_loss_kmajor.cpp: the faster GEMM layout on the CPU)."""
    return plan.backend == "cpp" and z.dtype == torch.float32


class _Chunks(NamedTuple):
    """What the student loop writes: row stats [4, N], dz [N, p] and U [K, p] (None when not needed), and
    the [K] bias-gradient accumulator dbeta (or None)."""
    stats: torch.Tensor
    dz: torch.Tensor | None
    u: torch.Tensor | None
    dbeta: torch.Tensor | None


def _student_rows(plan, z, w_gemm, col_scale, bias, probs, out: _Chunks, need_grad: bool) -> None:
    """The student chunks row-major: [rows, K] logits through the backend's `ce_rows`, image-major rows."""
    ce_rows = backends.ce_rows_impl(plan.backend)
    N, K = z.shape[0], w_gemm.shape[0]
    order = (torch.arange(N, device=z.device) if plan.same_view else image_major_order(plan.S, plan.B, z.device))
    rows = chunk_rows(N, K, z.element_size(), plan.chunk_bytes)
    buf = kept_empty(rows, K, dtype=z.dtype, device=z.device)
    u = out.u
    for i, r0 in enumerate(range(0, N, rows)):
        idx = order[r0:r0 + rows]
        z_c = z.detach().index_select(0, idx)
        raw = buf[:idx.numel()]
        torch.mm(z_c, w_gemm.t(), out=raw)
        weight_c = None if plan.row_weight is None else plan.row_weight.index_select(0, idx)
        st = ce_rows(raw, col_scale, bias, probs, idx, plan.B, plan.T, plan.same_view, weight_c, plan.grad_scale,
                     raw if need_grad else None, out.dbeta)
        out.stats.index_copy_(1, idx, st.to(out.stats.dtype))
        if out.dz is not None:
            out.dz.index_copy_(0, idx, torch.mm(raw, w_gemm))
        if u is not None:
            if i == 0 and u.dtype == raw.dtype:
                torch.mm(raw.t(), z_c, out=u)
            elif u.dtype == raw.dtype:
                u.addmm_(raw.t(), z_c)
            else:  # bf16/fp16 chunks: each chunk's product rounded once, the sum kept in fp32
                (u.copy_ if i == 0 else u.add_)(torch.mm(raw.t(), z_c))


def _student_kmajor(plan, z, w_gemm, col_scale, bias, probs_t, out: _Chunks, need_grad: bool, lanes: int) -> None:
    """The student chunks k-major (fp32, CPU): raw^T = v z_c^T [K, C] (C padded to the SIMD lanes with zero
    rows), `ce_cols` in place, then dz_c = G^T-as-stored read transposed, U += G z_c. Rows in view-major
    order, so a lane vector is consecutive images of one view and reads its teacher terms contiguously."""
    from dinovmf._ext import ce_cols_cpp
    N, K = z.shape[0], w_gemm.shape[0]
    rows = chunk_rows(N, K, z.element_size(), plan.chunk_bytes)
    flat = kept_empty(-(-rows // lanes) * lanes * K, dtype=z.dtype, device=z.device)  # [K, rows padded]
    zd = z.detach()
    for r0 in range(0, N, rows):
        c = min(rows, N - r0)
        z_c = zd[r0:r0 + c]
        z_pad = _padded_rows(z_c, lanes)
        raw_t = flat[:K * z_pad.shape[0]].view(K, z_pad.shape[0])
        torch.mm(w_gemm, z_pad.t(), out=raw_t)
        weight_c = None if plan.row_weight is None else plan.row_weight[r0:r0 + c].contiguous()
        out.stats[:, r0:r0 + c] = ce_cols_cpp(raw_t, col_scale, bias, probs_t, r0, c, plan.B, plan.T,
                                              plan.same_view, weight_c, plan.grad_scale, need_grad, out.dbeta)
        g_t = raw_t[:, :c]  # G * col_scale, k-major
        if out.dz is not None:
            torch.mm(g_t.t(), w_gemm, out=out.dz[r0:r0 + c])
        if out.u is not None:
            if r0 == 0:
                torch.mm(g_t, z_c, out=out.u)
            else:
                out.u.addmm_(g_t, z_c)


def _run(plan, z, w, g, need_dz: bool, need_dw: bool, need_dg: bool):
    """One call of the op; returns (loss, (dz, dw, dg)) and stores the by-products in `plan.result`."""
    kmajor = _uses_kmajor(plan, z)
    if kmajor:
        from dinovmf._ext import kmajor_lanes
        lanes = kmajor_lanes()
        probs_t, stat, t_entropy, t_argmax = _teacher_kmajor(plan, lanes)
        probs = probs_t[:, :plan.teacher_z.shape[0]].t()  # [Nt, K], a view of the k-major probabilities
    else:
        probs, stat, t_entropy, t_argmax = _teacher(plan, backends.teacher_rows_impl(plan.backend))
    K, p = w.shape
    N = z.shape[0]
    vdt = _vector_dtype(z.dtype)
    tau = plan.student_temp
    col_scale, norm, g_eff, w_norm = _column_scale(w, g, tau, vdt)
    need_grad = need_dz or need_dw or need_dg
    # The vMF bias, with a leaf to differentiate it by (|g| for (v, g), ||W|| for W) when the prototypes learn.
    bias_leaf = bias = bias64 = None
    if plan.vmf:
        with serial_vector_math(z.device):
            bias_leaf = (g.detach().double() if g is not None else norm.double()).requires_grad_(need_dw or need_dg)
            with torch.enable_grad():
                bias64 = vmf_column_bias(bias_leaf.abs() if g is not None else bias_leaf, tau, p)
            bias = bias64.detach().to(vdt)
    acc_dt = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    out = _Chunks(stats=torch.empty(4, N, dtype=vdt, device=z.device),
                  dz=torch.empty_like(z) if need_dz else None,
                  u=kept_empty(K, p, dtype=acc_dt, device=z.device) if (need_dw or need_dg) else None,
                  dbeta=torch.zeros(K, dtype=vdt, device=z.device) if plan.vmf and (need_dw or need_dg) else None)
    if kmajor:
        _student_kmajor(plan, z, w.detach(), col_scale, bias, probs_t, out, need_grad, lanes)
    else:
        _student_rows(plan, z, w.detach(), col_scale, bias, probs, out, need_grad)
    stats = out.stats
    weighted = stats[0] if plan.row_weight is None else stats[0] * plan.row_weight.to(vdt)
    loss = weighted.sum() * plan.grad_scale
    plan.result = HeadLossOutput(loss.detach(), stat, probs, t_entropy, t_argmax, (stats[1] - stats[3]).detach(),
                                 norm / tau)

    dw, dg = _prototype_gradients(out.u, w, g, g_eff, w_norm, bias64, bias_leaf, out.dbeta, need_dw, need_dg, vdt)
    return loss.to(torch.float64 if z.dtype == torch.float64 else torch.float32), (out.dz, dw, dg)


def _prototype_gradients(u, w, g, g_eff, w_norm, bias64, bias_leaf, dbeta, need_dw: bool, need_dg: bool, vdt):
    """(dL/dW or dL/dv, dL/dg) from U (the accumulated (G c)^T z, a buffer that becomes dW or dv in place)
    and the bias gradient dbeta (module docstring, step 3)."""
    if u is None:
        return None, None
    w = w.detach()
    d_bias = None
    if dbeta is not None:
        with serial_vector_math(w.device):
            (d_bias,) = torch.autograd.grad(bias64, bias_leaf, dbeta.to(torch.float64))
    if g is None:  # W: U is dL/dW through the logits; the bias adds dbeta_k dbeta_k/d||w_k|| w_k/||w_k||
        if d_bias is not None:
            u.addcmul_(w.to(u.dtype), (d_bias / bias_leaf.detach()).to(u.dtype).unsqueeze(1))
        return u.to(w.dtype), None
    u_dot_v = weight_norm_backward_(u, w, w_norm)  # u becomes dL/dv in place; dL/dg from the dots
    dg = None
    if need_dg:
        with serial_vector_math(w.device):
            dg = u_dot_v.to(vdt) / g_eff
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
        loss, grads = _run(plan, z, w, g, *plan.needs)
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
            grad_scale, weight = 1.0, (row_weight.detach() / row_weight.detach().sum()).to(_vector_dtype(student_z.dtype))
    else:
        S, T, B = layout
        grad_scale, weight = 1.0 / (pair_count(S, T) * B), None
    plan = _Plan(teacher_z=teacher_z, teacher_prototypes=_split_prototypes(teacher_prototypes, "teacher_prototypes"),
                 teacher_temp=teacher_temp, student_temp=student_temp, centering=centering,
                 center=None if center is None else center.detach(), vmf=bool(vmf), same_view=bool(same_view),
                 row_weight=weight, grad_scale=grad_scale, S=S, T=T, B=B, backend=name, chunk_bytes=chunk_bytes)
    grad_on = torch.is_grad_enabled()
    plan.needs = (grad_on and student_z.requires_grad, grad_on and w.requires_grad,
                  grad_on and g is not None and g.requires_grad)
    with torch.autocast(student_z.device.type, enabled=False):
        if any(plan.needs):
            loss = _HeadToLoss.apply(student_z, w, g, plan)
        else:
            loss, _ = _run(plan, student_z, w, g, False, False, False)
    return plan.result._replace(loss=loss)


__all__ = ["DEFAULT_CHUNK_BYTES", "HeadLossOutput", "check_head_loss_inputs", "check_prototypes", "chunk_rows",
           "hand_over_scaled", "head_to_loss", "image_major_order"]
