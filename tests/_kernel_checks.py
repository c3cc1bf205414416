"""Oracles and the tolerance rule every fused backend is tested with (tests/test_kernels_*.py).

Two families: the per-logits ops (`dino_cross_entropy`, `teacher_distribution` on a backend), checked
against `dinovmf.loss` / `dinovmf.centering` in float64; and the contract ops of the fused head-to-loss
path (`ce_rows`, `teacher_rows`), checked against the package's torch backend (`ce_rows_reference`,
`teacher_rows_reference`, wrapped below to run in float64, and in float32 for the flash rule's
"same-dtype torch" error).

Ground truth is float64: the torch reference (`dinovmf.loss` / `dinovmf.centering`) run on float64
copies of the very inputs the backend sees, plus a plain per-pair loop for the cross-entropy. The
tolerance follows flash-attention: a backend's error against float64 may be at most 2x the error of
the same-dtype torch reference, with a floor of a few output ulps (below which "2x" is just noise):

* outputs stored in fp32 (the loss, teacher probs and stats, fp32 gradients): 1e-5 of the largest
  magnitude. The kernels sum K <= 131072 terms in fp32 lanes and exp() in the C++ op is a 2-ulp
  polynomial, so a few 1e-6 relative is the expected error; 1e-5 leaves margin without hiding a bug
  (a wrong pairing or a missing bias moves values by >= 1e-3 relative).
* bf16 / fp16 gradients: one rounding to the output dtype, i.e. 2^-8 (bf16) and 2^-11 (fp16) of the
  largest magnitude — the same error the torch reference makes when autograd casts its gradient down.
"""
from __future__ import annotations

import torch

from dinovmf.centering import teacher_distribution_reference
from dinovmf.kernels.common import pair_count
from dinovmf.loss import dino_cross_entropy_reference

OUTPUT_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
TEMP = 0.05


def dino_cross_entropy_loop64(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Float64 oracle: the DINO loss as its definition reads, one (t, s) pair at a time."""
    S, B, _ = student_logits.shape
    T = teacher_probs.shape[0]
    log_q = torch.log_softmax(student_logits.double(), dim=-1)
    total = student_logits.new_zeros((), dtype=torch.float64)
    for t in range(T):
        for s in range(S):
            if s != t:
                total = total - (teacher_probs[t].double() * log_q[s]).sum()
    return total / (pair_count(S, T) * B)


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def assert_flash_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype_torch: torch.Tensor,
                      out_dtype: torch.dtype, gpu_extra: float = 0.0, interpreter_extra: float = 0.0) -> None:
    """|out - ref64| <= max(2 |torch - ref64|, floor(out_dtype) * max|ref64|), elementwise max, plus
    `gpu_extra` when `out` is on a GPU (what its approximate math adds, see `gpu_exp_error`) or
    `interpreter_extra` when it is not (see `interpreter_store_error`)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err, err_torch = max_abs_err(out, ref64), max_abs_err(same_dtype_torch, ref64)
    tol = max(2.0 * err_torch, OUTPUT_FLOOR[out_dtype] * ref64.abs().max().item())
    tol += gpu_extra if out.is_cuda else interpreter_extra
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (same-dtype torch: {err_torch:.3g})"


FP32_ULP = 2.0 ** -23  # one unit in the last place of a float32 in [1, 2)


def interpreter_store_error(dtype: torch.dtype, ref64: torch.Tensor) -> float:
    """What the interpreter adds when a kernel stores fp32 into bf16: its cast truncates (triton's
    interpreter calls `_convert_float` without a rounding mode), an error below one bf16 ulp (2^-7
    relative) instead of the half ulp of the GPU's `cvt.rn.bf16.f32` that the flash floor allows."""
    return 2.0 ** -8 * ref64.abs().max().item() if dtype == torch.bfloat16 else 0.0


def gpu_exp_error(p64: torch.Tensor) -> torch.Tensor:
    """Bound on the extra error GPU math adds to softmax rows p = exp(y - LSE(y)) [rows, K] (float64).

    Triton lowers fp32 `tl.exp(x)` to `ex2.approx.f32(x * log2 e)` (read from the PTX), the sequence of
    CUDA's `__expf`, whose error the CUDA C++ Programming Guide bounds by 2 + floor(1.173 |x|) ulp; the
    interpreter's numpy exp is correctly rounded to 0.5 ulp. Each p_k = exp(y_k - LSE) carries its own
    (2 + 1.173 |ln p_k|) ulp, and LSE inherits the relative error of S = sum_j exp(y_j - m): for the
    terms above 2^-24 (|y_j - m| <= 16.7) at most (2 + 1.173 * 16.7) ulp, for the rest at most
    K * 2^-24 * (2 + 1.173 * 104) ulp. Returns the elementwise bound on |p_gpu - p_interpreter|.
    (tl.log is libdevice logf, 1 ulp like numpy; divisions are div.full.f32, 2 ulp, and only form
    per-row scalars; FMA contraction changes roundings by <= 1 ulp of the products, inside the floor.)"""
    own = (2 + 1.173 * torch.log(p64).clamp(min=-104.0).abs()) * FP32_ULP
    return p64 * (own + gpu_lse_error(p64.shape[-1]))


def gpu_lse_error(K: int) -> float:
    """Bound on the extra absolute error of a row LSE on a GPU: the relative error of S (`gpu_exp_error`)."""
    return ((2 + 1.173 * 16.7) + K * 2.0 ** -24 * (2 + 1.173 * 104)) * FP32_ULP


def _row_max(x: torch.Tensor) -> float:
    return x.max().item() if x.numel() else 0.0


def cross_entropy_inputs(S, T, B, K, dtype, device="cpu", seed=0):
    """Student logits of spread ~3 (peaked softmaxes) and normalised fp32 teacher rows of spread ~3."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, B, K, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    probs = torch.softmax(torch.randn(T, B, K, generator=g, dtype=torch.float64) * 3, dim=-1)
    return logits, probs.to(device=device, dtype=torch.float32)


def check_cross_entropy(ce_fn, S, T, B, K, dtype, device="cpu", grad_scale=1.7, truncating_bf16_store=False):
    """Value and gradient of backend `ce_fn` against float64, under the flash rule; returns the errors.
    `truncating_bf16_store`: the backend is the Triton interpreter (see `interpreter_store_error`)."""
    logits, probs = cross_entropy_inputs(S, T, B, K, dtype, device)
    l64 = logits.double().requires_grad_()
    ref = dino_cross_entropy_reference(l64, probs.double())
    (ref * grad_scale).backward()
    loop = dino_cross_entropy_loop64(logits, probs)
    # The reference weights LSE by n_s (teacher rows sum to 1); fp32 rows sum to 1 within ~1e-7, so the
    # two float64 oracles agree to ~1e-7 relative. The loop is the definition, so it is the ground truth.
    assert abs(ref.item() - loop.item()) <= 1e-6 * abs(loop.item()), "float64 reference disagrees with the loop"

    l_torch = logits.clone().requires_grad_()
    ref_torch = dino_cross_entropy_reference(l_torch, probs)
    (ref_torch * grad_scale).backward()

    l_k = logits.clone().requires_grad_()
    out = ce_fn(l_k, probs)
    assert out.dim() == 0 and out.dtype == torch.float32, f"loss must be an fp32 scalar, got {out.dtype} {out.shape}"
    (out * grad_scale).backward()
    assert l_k.grad.dtype == dtype, f"gradient dtype {l_k.grad.dtype} != logits dtype {dtype}"
    # On a GPU: every row LSE may be off by gpu_lse_error, each gradient element by its softmax's bound.
    S, B, K = logits.shape
    bound_p = gpu_exp_error(torch.softmax(logits.double(), -1))
    n_s = torch.full((S, 1, 1), float(probs.shape[0]), dtype=torch.float64)
    n_s[:probs.shape[0]] -= 1.0
    scale = abs(grad_scale) / (pair_count(S, probs.shape[0]) * B)
    # the loss is sum_rows n_s LSE / (|pairs| B) + ...: its LSE errors weigh sum_s n_s B / (|pairs| B) = 1
    assert_flash_rule("loss", out, loop, ref_torch, torch.float32, gpu_extra=gpu_lse_error(K))
    assert_flash_rule("grad", l_k.grad, l64.grad, l_torch.grad, dtype, gpu_extra=_row_max(n_s * scale * bound_p),
                      interpreter_extra=interpreter_store_error(dtype, l64.grad) if truncating_bf16_store else 0.0)
    return max_abs_err(out, loop), max_abs_err(l_k.grad, l64.grad)


def teacher_inputs(N, K, dtype, mode, device="cpu", seed=0):
    """dots in [-1, 1] (unit vectors' cosines), norms in [0.25, 1.75], a mode-appropriate center."""
    g = torch.Generator().manual_seed(seed)
    dots = torch.randn(N, K, generator=g, dtype=torch.float64).clamp_(-1, 1).to(device=device, dtype=dtype)
    weight_norm = (torch.rand(K, generator=g, dtype=torch.float64) * 1.5 + 0.25).float().to(device)
    if mode == "prob":  # a probability vector, far from uniform so that dividing by it matters
        center = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0).float().to(device)
    else:
        center = (torch.randn(K, generator=g, dtype=torch.float64) * 0.3).float().to(device)
    return dots, center, weight_norm


def _assert_teacher_probs(probs, probs64, probs_torch, mode) -> torch.Tensor:
    """Teacher probabilities under the flash rule (plus the GPU exp bound) and rows summing to 1;
    returns the elementwise GPU bound."""
    bound_p = gpu_exp_error(probs64)
    if mode == "sinkhorn":  # 3 column and 3 row log-sum-exps shift y, each by at most one LSE error
        bound_p = bound_p + probs64 * 6 * gpu_lse_error(max(probs64.shape))
    assert_flash_rule("probs", probs, probs64, probs_torch, torch.float32, gpu_extra=_row_max(bound_p))
    row_sums = probs.double().sum(-1)
    assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5), "probs rows must sum to 1"
    return bound_p


def check_teacher(teacher_fn, N, K, dtype, mode, p=256, vmf=True, device="cpu"):
    """Probs and stat of backend `teacher_fn` against float64, under the flash rule (outputs are fp32)."""
    dots, center, weight_norm = teacher_inputs(N, K, dtype, mode, device)
    wn = weight_norm if vmf else None
    c = center if mode in ("logit", "prob") else None
    probs64, stat64 = teacher_distribution_reference(dots.double(), TEMP, mode, None if c is None else c.double(),
                                                     None if wn is None else wn.double(), p if vmf else None)
    probs_t, stat_t = teacher_distribution_reference(dots, TEMP, mode, c, wn, p if vmf else None)
    probs, stat = teacher_fn(dots, TEMP, mode, c, wn, p if vmf else None)
    assert probs.dtype == torch.float32, f"probs must be fp32, got {probs.dtype}"
    _assert_teacher_probs(probs, probs64, probs_t, mode)
    if stat64 is None:
        assert stat is None, f"mode {mode!r} has no stat, got {type(stat)}"
    else:
        assert stat is not None and stat.dtype == torch.float32
        extra = _row_max(gpu_exp_error(torch.softmax(probs64.log() + torch.log(c.double()), 1)).mean(0)) \
            if mode == "prob" else 0.0  # softmax(x) = normalise(probs * center)
        assert_flash_rule("stat", stat, stat64, stat_t, torch.float32, gpu_extra=extra)


# ---------------------------------------------------------------------------------------------------
# The contract ops of the fused head-to-loss path: references, inputs, and the GPU error model.

def ce_rows_reference(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight, grad_scale,
                      acc=torch.float64):
    """The package's `ce_rows_reference` (the torch backend) run in `acc`, as functions of the inputs: (stats
    [4, c] = loss_row, lse, psum, sum softmax*l; G * col_scale [c, K]; the col_grad_sum increment G.sum(0)
    [K]). The package computes in the logits' precision class (fp32, or float64 for float64 logits), so
    the inputs are cast to `acc` first: float64 is the oracle, float32 the flash rule's same-dtype torch."""
    from dinovmf.loss_reference import ce_rows_reference as package_reference

    def cast(x):
        return None if x is None else x.to(acc).contiguous()
    logits = cast(logits)
    grad, col_sum = torch.empty_like(logits), torch.zeros(logits.shape[1], dtype=acc, device=logits.device)
    stats = package_reference(logits, cast(col_scale), cast(bias), cast(teacher_probs), row_index, B, T, same_view,
                              cast(row_weight), grad_scale, grad, col_sum)
    return stats, grad, col_sum


def teacher_rows_reference(dots, temp, mode, center, col_scale, bias, acc=torch.float64):
    """The package's `teacher_rows_reference` run in `acc` (inputs cast first, as `ce_rows_reference`):
    (probs, stat or None, row_entropy, row_argmax)."""
    from dinovmf.centering import teacher_rows_reference as package_reference

    def cast(x):
        return None if x is None else x.to(acc)
    return package_reference(cast(dots), temp, mode, cast(center), cast(col_scale), cast(bias))


def ce_rows_inputs(S, T, B, K, dtype, *, same_view=False, rows=None, col_scale=True, bias=True, row_weight=True,
                   device="cpu", seed=0):
    """Raw GEMM rows [c, K] of spread ~3, column scales in [0.5, 1.5], a bias of spread ~1, normalised
    teacher rows [T*B, K] (DINO) or [S*B, K] (same view), row weights in [0.2, 1.2] and the chunk's
    global rows `rows` (default: all S*B rows, image-major)."""
    g = torch.Generator().manual_seed(seed)
    n_teacher = S * B if same_view else T * B
    if rows is None:
        rows = torch.arange(S * B).view(S, B).t().reshape(-1)  # image-major, as the host orders a chunk
    c = rows.numel()

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    logits = (rand(c, K) * 3).to(dtype)
    probs = torch.softmax(rand(n_teacher, K) * 3, 1).float()
    cs = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).float() if col_scale else None
    b = rand(K).float() if bias else None
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.2).float() if row_weight else None
    to = (lambda x: None if x is None else x.to(device))
    return to(logits), to(cs), to(b), to(probs), to(rows.long()), to(w)


def teacher_rows_inputs(N, K, dtype, mode, *, col_scale=True, bias=True, device="cpu", seed=0):
    """Teacher dots in [-1, 1] (cosines with v), column scales in [0.5, 1.5], a vMF-sized bias (spread
    0.5), and the mode's center (as `teacher_inputs`); returns (dots, center or None, col_scale, bias)."""
    dots, center, _ = teacher_inputs(N, K, dtype, mode, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    cs = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).float().to(device) if col_scale else None
    b = (torch.randn(K, generator=g, dtype=torch.float64) * 0.5).float().to(device) if bias else None
    return dots, (center if mode in ("logit", "prob") else None), cs, b


def check_ce_rows(ce_fn, S, T, B, K, dtype, *, same_view=False, rows=None, col_scale=True, bias=True,
                  row_weight=True, grad="inplace", col_grad_sum=True, device="cpu", grad_scale=0.37,
                  truncating_bf16_store=False):
    """A `ce_rows` backend against float64 under the flash rule: the four row statistics, grad_out
    ("inplace": over the logits, "out": a separate buffer, None: no gradient) and `col_grad_sum +=`.
    `truncating_bf16_store`: the backend is the Triton interpreter (see `interpreter_store_error`)."""
    logits, cs, b, P, ri, w = ce_rows_inputs(S, T, B, K, dtype, same_view=same_view, rows=rows, col_scale=col_scale,
                                             bias=bias, row_weight=row_weight, device=device)
    args = (P, ri, B, T, same_view, w, grad_scale)
    stats64, grad64, colsum64 = ce_rows_reference(logits, cs, b, *args)
    stats32, grad32, colsum32 = ce_rows_reference(logits, cs, b, *args, acc=torch.float32)
    x = logits.clone()
    grad_out = {"inplace": x, "out": torch.full_like(x, float("nan")), None: None}[grad]
    cgs0 = torch.randn(K, generator=torch.Generator().manual_seed(7)).to(device) if col_grad_sum else None
    cgs = cgs0.clone() if col_grad_sum else None
    stats = ce_fn(x, cs, b, *args, grad_out, cgs)
    assert stats.shape == (4, logits.shape[0]) and stats.dtype == torch.float32, f"stats {stats.dtype} {stats.shape}"

    # What the GPU's exp adds (0 on CPU), from the float64 softmax of l (see gpu_exp_error).
    l64 = logits.double() * (cs.double() if cs is not None else 1.0) + (b.double() if b is not None else 0.0)
    bound_p = gpu_exp_error(torch.softmax(l64, 1))
    g_scale = (stats64[2] * (w.double() if w is not None else 1.0) * grad_scale).abs()[:, None]
    extra = [_row_max(stats64[2]) * gpu_lse_error(K), gpu_lse_error(K), 0.0, _row_max((bound_p * l64.abs()).sum(1))]
    for i, name in enumerate(("loss_row", "lse", "psum", "sum softmax*l")):
        assert_flash_rule(name, stats[i], stats64[i], stats32[i], torch.float32, gpu_extra=extra[i])
    if grad is None:
        assert torch.equal(x, logits), "grad_out=None must leave the logits untouched"
    else:
        cs_abs = cs.double().abs() if cs is not None else 1.0
        assert_flash_rule("grad_out", grad_out, grad64, grad32.to(dtype), dtype,
                          gpu_extra=_row_max(g_scale * bound_p * cs_abs),
                          interpreter_extra=interpreter_store_error(dtype, grad64) if truncating_bf16_store else 0.0)
    if col_grad_sum:
        assert_flash_rule("col_grad_sum", cgs, cgs0.double() + colsum64, cgs0 + colsum32, torch.float32,
                          gpu_extra=_row_max((g_scale * bound_p).sum(0)))
    return stats


def check_teacher_rows(teacher_fn, N, K, dtype, mode, *, col_scale=True, bias=True, inplace=False, device="cpu"):
    """A `teacher_rows` backend against float64 under the flash rule: probs (written over the dots with
    `inplace`), the center statistic, the row entropy and the row argmax."""
    dots, center, cs, b = teacher_rows_inputs(N, K, dtype, mode, col_scale=col_scale, bias=bias, device=device)
    probs64, stat64, ent64, arg64 = teacher_rows_reference(dots, TEMP, mode, center, cs, b)
    probs32, stat32, ent32, _ = teacher_rows_reference(dots, TEMP, mode, center, cs, b, acc=torch.float32)
    d = dots.clone()
    probs, stat, ent, arg = teacher_fn(d, TEMP, mode, center, cs, b, d if inplace else None)
    assert probs.dtype == torch.float32 and probs.shape == (N, K), f"probs {probs.dtype} {tuple(probs.shape)}"
    if inplace:
        assert probs.data_ptr() == d.data_ptr(), "out=dots must write the probs over the dots"

    bound_p = _assert_teacher_probs(probs, probs64, probs32, mode)
    if stat64 is None:
        assert stat is None, f"mode {mode!r} has no stat, got {type(stat)}"
    else:
        assert stat is not None and stat.dtype == torch.float32 and stat.shape == (K,)
        extra = 0.0
        if mode == "prob":
            r64 = dots.double() * (cs.double() if cs is not None else 1.0) + TEMP * (b.double() if b is not None else 0.0)
            extra = _row_max(gpu_exp_error(torch.softmax(r64 / TEMP, 1)).mean(0))
        assert_flash_rule("stat", stat, stat64, stat32, torch.float32, gpu_extra=extra)
    assert ent.dtype == torch.float32 and ent.shape == (N,)
    assert_flash_rule("row_entropy", ent, ent64, ent32, torch.float32,
                      gpu_extra=_row_max((bound_p * (probs64.log().clamp(min=-104).abs() + 1)).sum(1)))
    assert_row_argmax(arg, probs64)
    return probs, stat, ent, arg


def assert_row_argmax(arg: torch.Tensor, probs64: torch.Tensor) -> None:
    """`arg` is the float64 argmax on every row whose top two probabilities differ by more than fp32
    resolves (1e-5 relative); near-ties are left to the exact-tie test."""
    assert arg.dtype == torch.int64 and arg.shape == probs64.shape[:1], f"row_argmax {arg.dtype} {tuple(arg.shape)}"
    top2 = probs64.topk(2, dim=1).values
    clear = ((top2[:, 0] - top2[:, 1]) > 1e-5 * top2[:, 0]).cpu()
    assert torch.equal(arg.cpu()[clear], probs64.argmax(1).cpu()[clear]), "row_argmax differs from float64"
