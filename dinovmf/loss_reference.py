"""The PyTorch references of the loss path: plain autograd, float64-capable, the oracles every backend and
the fused head-to-loss op (`dinovmf.head_loss`) are tested against, and the "eager" baseline of the
benchmarks. Nothing here is fast; everything here is obviously the definition.

* `prototype_logits` — student logits `z @ W.T / tau (+ vMF column bias)`;
* `dino_cross_entropy_reference` — DINO's multi-view cross-entropy on [S, B, K] logits;
* `patch_cross_entropy` — the same-view (iBOT patch) cross-entropy with row weights;
* `ce_rows_reference` — the `torch` backend's `ce_rows` kernel (docs/INTERFACES.md, Backends);
* `head_to_loss_reference` — the whole op by autograd: prototypes (W or weight-normed (v, g)) -> logits
  -> cross-entropy, with the teacher from `dinovmf.centering.teacher_rows_reference`.

Pairing (DESIGN §1): teacher view t < T is the student's global view t; every teacher view is paired
with every student view s != t. With `Pbar_s = sum_{t paired with s} P_t` and `n_s` its count, one
student row contributes `n_s * LSE(l_s) - Pbar_s . l_s`, so the loss is

    L = 1 / (|pairs| B) * sum_s sum_b [ n_s LSE(l_s,b) - Pbar_s,b . l_s,b ],   |pairs| = T (S - 1)

(equal to the mean of -sum_k P_t log_softmax(l_s) because teacher rows sum to one).
"""
from __future__ import annotations

import torch

from dinovmf.centering import row_entropy, teacher_bias, teacher_rows_reference
from dinovmf.kernels.common import check_ce_inputs, check_ce_rows_inputs, check_visit_inner, pair_count
from dinovmf.models.head import effective_prototypes
from dinovmf.vmf import vmf_logits


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prototype_logits(z: torch.Tensor, weight: torch.Tensor, temp: float, vmf: bool) -> torch.Tensor:
    """Student logits [N, K]: vMF logits (`vmf=True`) or DINO's plain `z @ weight.T / temp`."""
    if vmf:
        return vmf_logits(z, weight, temp)
    if z.dim() != 2 or weight.dim() != 2 or z.shape[1] != weight.shape[1]:
        raise ValueError(f"z [N, p] and weight [K, p] must share p, got {tuple(z.shape)} and {tuple(weight.shape)}")
    return z @ weight.t() / temp


def dino_cross_entropy_reference(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over DINO pairs and batch of -sum_k P_t log_softmax(student_s), vectorised (single-pass form).

    student_logits [S, B, K] (any float dtype; differentiable), teacher_probs [T, B, K] (T <= S, not
    differentiated). Accumulates in float32 (float64 if the logits are float64); returns a 0-d tensor
    of that dtype.
    """
    check_ce_inputs(student_logits, teacher_probs)
    (s, b, _), t = student_logits.shape, teacher_probs.shape[0]
    acc = _accumulation_dtype(student_logits)
    logits = student_logits.to(acc)
    probs = teacher_probs.detach().to(acc)

    # n_s: view s < T is not paired with its own teacher view.
    n_pairs_per_view = torch.full((s,), float(t), dtype=acc, device=logits.device)
    n_pairs_per_view[:t] -= 1.0
    lse = torch.logsumexp(logits, dim=-1)  # [S, B]
    # Pbar_s . l_s = (sum_t P_t) . l_s - [s < T] P_s . l_s, without materialising Pbar per view.
    cross = (probs.sum(dim=0) * logits).sum(dim=-1)  # [S, B]
    cross[:t] -= (probs * logits[:t]).sum(dim=-1)
    total = (n_pairs_per_view[:, None] * lse - cross).sum()
    return total / (t * (s - 1) * b)


def patch_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Same-view CE for iBOT's patch loss: (weighted) mean over rows of -sum_k P log_softmax(l).

    student_logits [N, K] (the masked patch rows), teacher_probs [N, K], weights [N] optional: the
    result is sum(w * ce) / sum(w). iBOT weights each masked patch by 1 / (masked patches in its
    image), which makes this the mean over images of the per-image mean. Float32 accumulation.
    """
    for name, x in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D floating-point tensor [N, K]")
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(f"teacher_probs shape {tuple(teacher_probs.shape)} must equal student_logits "
                         f"shape {tuple(student_logits.shape)}")
    acc = _accumulation_dtype(student_logits)
    ce = -(teacher_probs.detach().to(acc) * torch.log_softmax(student_logits.to(acc), dim=-1)).sum(dim=-1)
    if weights is None:
        return ce.mean()
    if weights.shape != ce.shape:
        raise ValueError(f"weights must have shape [N]={ce.shape[0]}, got {tuple(weights.shape)}")
    w = weights.detach().to(acc)
    return (w * ce).sum() / w.sum()


def paired_teacher_sum(teacher_probs: torch.Tensor, row_index: torch.Tensor, B: int, T: int,
                       same_view: bool) -> torch.Tensor:
    """Pbar [c, K] of the student rows `row_index`: the teacher row of the same index (same view), or the
    sum of the teacher views t != s of image b, for student row s*B + b (DINO pairing)."""
    if same_view:
        return teacher_probs[row_index]
    s, b = row_index // B, row_index % B
    views = torch.arange(T, device=row_index.device)
    paired = (views[:, None] != s[None, :]).to(teacher_probs.dtype)  # [T, c]
    return torch.einsum("tc,tck->ck", paired, teacher_probs.view(T, B, -1)[:, b])


@torch.no_grad()
def ce_rows_reference(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight, grad_scale,
                      grad_out, col_grad_sum, *, visit_inner: int = 1):
    """The `ce_rows` kernel in PyTorch (docs/INTERFACES.md, Backends): returns stats [4, c] (loss_row, lse,
    psum, sum_k softmax_k l_k) with l = logits * col_scale + bias; writes G * col_scale to `grad_out` (it
    may alias `logits`) and adds G.sum(0) to `col_grad_sum`, where G = (psum softmax(l) - Pbar) *
    grad_scale * row_weight. Float32 arithmetic (float64 for float64 logits). `visit_inner`, a
    visiting-order hint for cache-bound kernels, is checked and has nothing to order here."""
    check_ce_rows_inputs(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight,
                         grad_out, col_grad_sum)
    check_visit_inner(visit_inner, logits.shape[0])
    acc = _accumulation_dtype(logits)
    l = logits.to(acc)
    if col_scale is not None:
        l = l * col_scale.to(acc)
    if bias is not None:
        l = l + bias.to(acc)
    pbar = paired_teacher_sum(teacher_probs.to(acc), row_index, B, T, same_view)
    lse = torch.logsumexp(l, dim=1)
    q = torch.softmax(l, dim=1)
    psum = pbar.sum(dim=1)
    stats = torch.stack([psum * lse - (pbar * l).sum(dim=1), lse, psum, (q * l).sum(dim=1)])
    if grad_out is not None:
        g = (psum[:, None] * q - pbar) * grad_scale
        if row_weight is not None:
            g = g * row_weight.to(acc)[:, None]
        if col_grad_sum is not None:
            col_grad_sum += g.sum(dim=0).to(col_grad_sum.dtype)
        grad_out.copy_(g * col_scale.to(acc) if col_scale is not None else g)
    return stats if acc == torch.float64 else stats.float()


def head_to_loss_reference(student_z, teacher_z, student_prototypes, teacher_prototypes, *, student_temp: float,
                           teacher_temp: float, centering: str = "logit", center=None, vmf: bool = True,
                           n_global: int | None = None, same_view: bool = False, row_weight=None):
    """The fused op's definition by autograd (see `dinovmf.head_loss.head_to_loss` for the arguments):
    returns a `HeadLossOutput` whose loss is differentiable w.r.t. `student_z` and the student prototypes.
    Materialises the [N, K] logits and everything autograd keeps: a reference, not a training path."""
    from dinovmf.head_loss import HeadLossOutput, check_head_loss_inputs

    layout = check_head_loss_inputs(student_z, teacher_z, student_prototypes, teacher_prototypes, n_global,
                                    same_view, row_weight)
    p = student_z.shape[1]
    w_s = effective_prototypes(student_prototypes)
    logits = prototype_logits(student_z, w_s, student_temp, vmf)  # [N, K]
    with torch.no_grad():
        w_t = effective_prototypes(teacher_prototypes).detach()
        bias = teacher_bias(torch.linalg.vector_norm(w_t.float() if w_t.dtype != torch.float64 else w_t, dim=1),
                            teacher_temp, p) if vmf else None
        probs, stat, t_entropy, t_argmax = teacher_rows_reference(teacher_z.detach() @ w_t.t(), teacher_temp,
                                                                  centering, center, None, bias)
    if same_view:
        loss = patch_cross_entropy(logits, probs, row_weight)
    else:
        s, t, b = layout
        loss = dino_cross_entropy_reference(logits.view(s, b, -1), probs.view(t, b, -1))
    with torch.no_grad():
        s_entropy = row_entropy(torch.softmax(logits.detach().to(_accumulation_dtype(logits)), dim=1))
        kappa = torch.linalg.vector_norm(w_s.detach().to(_accumulation_dtype(w_s)), dim=1) / student_temp
    return HeadLossOutput(loss, stat, probs, t_entropy, t_argmax, s_entropy, kappa)


__all__ = ["ce_rows_reference", "dino_cross_entropy_reference", "head_to_loss_reference",
           "paired_teacher_sum", "patch_cross_entropy", "prototype_logits", "pair_count"]
