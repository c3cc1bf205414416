"""The per-logits DINO cross-entropy `dino_cross_entropy(student_logits [S, B, K], teacher_probs [T, B, K])`
in Triton, as an autograd function on top of `ce_rows` (one implementation of the fused CE).

Forward runs the statistics passes of `ce_rows` on the view-major rows [S*B, K], visiting them image-major
(all S views of image b in a row) so the T teacher rows of b are re-read from cache, not from memory;
the loss is the sum of the row losses / (|pairs| B). Backward runs the gradient pass with the upstream
gradient read on the device (no host sync): the logits are read twice in all, as before.
"""
from __future__ import annotations

import torch

from dinovmf.kernels.ce_rows import ce_row_grad, ce_row_stats
from dinovmf.kernels.common import check_ce_inputs, pair_count


class DinoCrossEntropyTriton(torch.autograd.Function):
    """Saves the logits (no copy), the teacher rows and the row statistics [4, S*B]."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        S, B, K = student_logits.shape
        T = teacher_probs.shape[0]
        logits = student_logits.reshape(S * B, K)
        if K > 1 and logits.stride(1) != 1:
            logits = logits.contiguous()
        probs = teacher_probs.reshape(T * B, K).float()
        if K > 1 and probs.stride(1) != 1:
            probs = probs.contiguous()
        row_index = torch.arange(S * B, device=logits.device)
        stats = ce_row_stats(logits, None, None, probs, row_index, B, T, False, visit_inner=S)
        ctx.save_for_backward(logits, probs, row_index, stats)
        ctx.dims = (S, B, T)
        ctx.scale = 1.0 / (pair_count(S, T) * B)
        return stats[0].sum() * ctx.scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, probs, row_index, stats = ctx.saved_tensors
        S, B, T = ctx.dims
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        ce_row_grad(logits, None, None, probs, row_index, B, T, False, None, ctx.scale, grad, None, stats,
                    visit_inner=S, grad_scale_tensor=grad_out.detach().float().reshape(1))
        return grad.view(S, B, -1), None


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over DINO pairs and batch of -sum_k P_t log_softmax(l_s): fp32 scalar, differentiable in
    `student_logits` [S, B, K] (any float dtype); `teacher_probs` [T, B, K] is treated as a constant."""
    check_ce_inputs(student_logits, teacher_probs)
    return DinoCrossEntropyTriton.apply(student_logits, teacher_probs.detach())
