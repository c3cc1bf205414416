"""Oracles and the tolerance rule every fused backend is tested with (tests/test_kernels_*.py).

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
                      out_dtype: torch.dtype) -> None:
    """|out - ref64| <= max(2 |torch - ref64|, floor(out_dtype) * max|ref64|), elementwise max."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err, err_torch = max_abs_err(out, ref64), max_abs_err(same_dtype_torch, ref64)
    tol = max(2.0 * err_torch, OUTPUT_FLOOR[out_dtype] * ref64.abs().max().item())
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (same-dtype torch: {err_torch:.3g})"


def cross_entropy_inputs(S, T, B, K, dtype, device="cpu", seed=0):
    """Student logits of spread ~3 (peaked softmaxes) and normalised fp32 teacher rows of spread ~3."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, B, K, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    probs = torch.softmax(torch.randn(T, B, K, generator=g, dtype=torch.float64) * 3, dim=-1)
    return logits, probs.to(device=device, dtype=torch.float32)


def check_cross_entropy(ce_fn, S, T, B, K, dtype, device="cpu", grad_scale=1.7):
    """Value and gradient of backend `ce_fn` against float64, under the flash rule; returns the errors."""
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
    assert_flash_rule("loss", out, loop, ref_torch, torch.float32)
    assert_flash_rule("grad", l_k.grad, l64.grad, l_torch.grad, dtype)
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
    assert_flash_rule("probs", probs, probs64, probs_t, torch.float32)
    row_sums = probs.double().sum(-1)
    assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5), "probs rows must sum to 1"
    if stat64 is None:
        assert stat is None, f"mode {mode!r} has no stat, got {type(stat)}"
    else:
        assert stat is not None and stat.dtype == torch.float32
        assert_flash_rule("stat", stat, stat64, stat_t, torch.float32)
