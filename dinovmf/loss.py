"""The DINO / DINO-vMF loss: `DINOLoss` (head features -> loss + metrics, through the fused head-to-loss op
of `dinovmf.head_loss`) and the per-logits `dino_cross_entropy` building block.

The math is DESIGN §1 and `dinovmf.loss_reference` (the PyTorch references, re-exported here): with
`Pbar_s = sum_{t paired with s} P_t` one student row contributes `n_s * LSE(l_s) - Pbar_s . l_s`.
"""
from __future__ import annotations

import torch

from dinovmf import backends
from dinovmf.centering import TeacherCenter, teacher_distribution, teacher_distribution_reference  # noqa: F401
from dinovmf.head_loss import DEFAULT_CHUNK_BYTES, check_prototypes, hand_over_scaled, head_to_loss
from dinovmf.kernels.common import check_ce_inputs, pair_count, serial_vector_math
from dinovmf.loss_reference import (dino_cross_entropy_reference, patch_cross_entropy,  # noqa: F401 - re-exported
                                    prototype_logits)


class _RowsCrossEntropy(torch.autograd.Function):
    """`dino_cross_entropy` on a backend's `ce_rows` kernel: the logits' gradient is written during the
    forward (one pass over the logits after the row statistics) and scaled by grad_output in backward.
    The rows are view-major [S*B]; `visit_inner=S` asks the kernel to walk them image by image, so the S
    rows that share an image's T teacher rows are visited together (a cache hint; same results)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_probs, ce_rows, need_grad):
        S, B, K = student_logits.shape
        T = teacher_probs.shape[0]
        logits = student_logits.detach().contiguous().view(S * B, K)
        grad = torch.empty_like(logits) if need_grad else None
        scale = 1.0 / (pair_count(S, T) * B)
        rows = torch.arange(S * B, device=logits.device)
        acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        probs = teacher_probs.detach().to(acc).contiguous().view(T * B, K)  # fp32 for the kernels
        stats = ce_rows(logits, None, None, probs, rows, B, T, False, None, scale, grad, None, visit_inner=S)
        ctx.grads = None if grad is None else (grad.view(S, B, K),)
        return stats[0].to(acc).sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        return (*hand_over_scaled(grads, grad_loss), None, None, None)


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       backend: str = "auto") -> torch.Tensor:
    """Mean over DINO pairs and batch of -sum_k P_t log_softmax(student_s) (see
    `dino_cross_entropy_reference`) on `backend`'s `ce_rows` kernel: auto/torch/cpp/triton.

    student_logits [S, B, K] (any float dtype, differentiable), teacher_probs [T, B, K] (not
    differentiated). Returns an fp32 0-d tensor (float64 for float64 logits on the torch backend).
    "auto" picks the fastest backend available on the logits' device; an unknown or unavailable
    backend raises `dinovmf.backends.BackendUnavailable` saying why.
    """
    check_ce_inputs(student_logits, teacher_probs)
    ce_rows = backends.ce_rows_impl(backends.resolve_backend(backend, student_logits.device))
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _RowsCrossEntropy.apply(student_logits, teacher_probs, ce_rows, need_grad)


def used_prototype_count(argmax: torch.Tensor, K: int) -> torch.Tensor:
    """0-d float tensor: how many of the K prototypes are the argmax of at least one row (no host sync)."""
    hit = torch.zeros(K, dtype=torch.float32, device=argmax.device)
    return hit.index_fill_(0, argmax, 1.0).sum()


class DINOLoss(torch.nn.Module):
    """From head outputs to the DINO (`vmf=False`) or DINO-vMF (`vmf=True`) loss, by the fused op.

    forward(student_z [S*B, p], teacher_z [T*B, p], student_weight, teacher_weight, teacher_temp,
    n_global=T) -> (loss, metrics). Rows are unit vectors, view-major. Each weight is either the
    prototype matrix W [K, p] or DINOHead's weight-norm parameters as a pair `(v [K, p], g [K])` with
    w_k = g_k v_k / ||v_k|| (then no W is formed, and the gradients reach v and g directly). The teacher
    side is computed without grad from the teacher prototypes (their norms give the teacher's vMF bias);
    the student side differentiates through `student_z` and the student prototypes. The center is
    updated after the loss is computed. (KoLeo-proto is an objective term of its own: `dinovmf.objectives`.)

    Metrics are 0-d tensors on the loss's device (no host sync here; `trainer.to_floats` turns them
    into floats in one sync when they are logged): loss, teacher_entropy, student_entropy (mean row
    entropies, by-products of the kernels),
    teacher_used_prototypes (prototypes that are the argmax of >= 1 teacher row in this local batch),
    kappa_min / kappa_mean / kappa_max of the student prototypes (||w_k|| / student_temp). The O(K^2 p)
    `prototypes.prototype_utilisation` is left to the trainer's periodic evaluation.
    """

    def __init__(self, out_dim: int, p: int = 256, vmf: bool = True, student_temp: float = 0.1,
                 centering: str = "logit", center_momentum: float = 0.9, backend: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        if not (isinstance(student_temp, (int, float)) and student_temp > 0):
            raise ValueError(f"student_temp must be > 0, got {student_temp!r}")
        self.out_dim, self.p, self.vmf = out_dim, p, vmf
        self.student_temp, self.backend = float(student_temp), backend
        self.chunk_bytes = chunk_bytes
        self.center = TeacherCenter(out_dim, centering, center_momentum, backend=backend)

    def _check_shapes(self, student_z, teacher_z, student_weight, teacher_weight, n_global) -> None:
        for name, x in (("student_z", student_z), ("teacher_z", teacher_z)):
            if x.dim() != 2 or x.shape[1] != self.p:
                raise ValueError(f"{name} must be [rows, p={self.p}], got {tuple(x.shape)}")
        check_prototypes(student_weight, "student_weight", self.out_dim, self.p)
        check_prototypes(teacher_weight, "teacher_weight", self.out_dim, self.p)
        if isinstance(n_global, bool) or not isinstance(n_global, int) or n_global < 1:
            raise ValueError(f"n_global must be a positive int, got {n_global!r}")

    def forward(self, student_z: torch.Tensor, teacher_z: torch.Tensor, student_weight, teacher_weight,
                teacher_temp: float, n_global: int):
        self._check_shapes(student_z, teacher_z, student_weight, teacher_weight, n_global)
        out = head_to_loss(student_z, teacher_z, student_weight, teacher_weight, student_temp=self.student_temp,
                           teacher_temp=teacher_temp, centering=self.center.mode, center=self.center.state,
                           vmf=self.vmf, n_global=n_global, backend=self.backend, chunk_bytes=self.chunk_bytes)
        self.center.observe(out.center_stat)
        loss = out.loss
        self.center.update()

        with torch.no_grad(), serial_vector_math(loss.device):
            metrics = {
                "loss": loss.detach().float(),
                "teacher_entropy": out.teacher_entropy.float().mean(),
                "student_entropy": out.student_entropy.float().mean(),
                "kappa_min": out.kappa.min().float(), "kappa_mean": out.kappa.mean().float(),
                "kappa_max": out.kappa.max().float(),
                "teacher_used_prototypes": used_prototype_count(out.teacher_argmax, self.out_dim),
            }
        return loss, metrics


__all__ = ["dino_cross_entropy", "dino_cross_entropy_reference", "teacher_distribution",
           "teacher_distribution_reference", "TeacherCenter", "DINOLoss", "patch_cross_entropy", "prototype_logits",
           "used_prototype_count"]
