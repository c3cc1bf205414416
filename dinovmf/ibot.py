"""The iBOT(-vMF) patch loss: masked-token prediction against the teacher's patch distributions.

The student sees the global crops with some patch tokens replaced by the mask token (`dinovmf.masking`);
the teacher sees the same crops unmasked. At every masked position of a view, the student's patch
prediction is trained towards the teacher's distribution for that same patch of the same view:

    L = mean over images b with any mask of  mean over masked j of  -sum_k P[b,j,k] log q[b,j,k]

(iBOT's per-image weighting: each masked token has weight 1 / (masked tokens of its image), so a large
mask does not outweigh a small one; images without a mask take no part — the mean is over images with
one). `q = softmax(l)` with vMF logits `l = z @ W.T / tau_s + log C_p(||w_k|| / tau_s)` (`vmf=True`;
plain DINO logits otherwise) and the teacher's `P` comes from its own `TeacherCenter` (prob centering for
iBOT-vMF), exactly as the CLS loss but with separate statistics: patch tokens and CLS tokens have
different marginals over the prototypes.

Only the masked rows are ever turned into logits, on both sides (the teacher's distribution and its center
statistic use the masked positions too, as DINOv2 does; iBOT centers over all patch tokens). With
mask ratios up to 0.3 on half the images that is ~1/13 of the patch tokens. Both sides run through the
fused head-to-loss op (`dinovmf.head_loss`) with same-view pairing (student row i against teacher row i)
and iBOT's row weights; `dinovmf.loss_reference.patch_cross_entropy` is its PyTorch reference.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dinovmf.centering import TeacherCenter
from dinovmf.head_loss import check_prototypes, head_to_loss
from dinovmf.loss import used_prototype_count


def masked_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """iBOT's weight of each masked token, in the row order of `tokens[masks]`: float32 [n_masked].

    A masked token of image b gets `1 / (masked tokens of b) / (images with any mask)`, so the weights
    sum to 1 and `sum(w * ce)` is the mean over masked images of the per-image mean CE.
    """
    per_image = masks.sum(dim=1)  # [images]
    n_masked_images = int((per_image > 0).sum())
    if n_masked_images == 0:
        return torch.zeros(0, dtype=torch.float32, device=masks.device)
    image_of_row = torch.nonzero(masks, as_tuple=True)[0]
    return 1.0 / (per_image[image_of_row].float() * n_masked_images)


class IBOTPatchLoss(torch.nn.Module):
    """iBOT(-vMF) masked patch loss with its own teacher center (see the module docstring).

    Args:
        out_dim: K, the prototypes of the patch head (8192 in the iBOT recipes).
        p: bottleneck dimension (the sphere the patch features and prototypes live on).
        vmf: vMF-normalised logits (iBOT-vMF) or plain DINO logits (iBOT).
        student_temp: tau_s. centering, center_momentum: the patch center (`TeacherCenter`).
        backend: row-kernel backend of the fused op ("auto", "torch", "cpp", "triton").

    forward(student_patch_z [G*B, n, p], teacher_patch_z [G*B, n, p], masks [G*B, n] bool,
    student_weight, teacher_weight, teacher_temp) -> (loss, metrics). The z rows are unit
    vectors (the head normalises them); row r of the student features is the masked version of row r of
    the teacher's. `student_weight` / `teacher_weight` are the patch head's prototypes — the CLS head's
    when the head is shared — as W [K, p] or the weight-norm pair (v [K, p], g [K]) (see `DINOLoss`).
    The center is updated after the loss is computed.

    Metrics (0-d tensors on the loss's device, as `DINOLoss`'s): loss_patch, patch_teacher_entropy,
    patch_student_entropy (absent when no token is masked), patch_used_prototypes (teacher argmax winners
    among the masked tokens), masked_tokens, masked_images, mask_ratio (masked tokens / all tokens).
    """

    def __init__(self, out_dim: int, p: int = 256, vmf: bool = True, student_temp: float = 0.1,
                 centering: str = "prob", center_momentum: float = 0.9, backend: str = "auto"):
        super().__init__()
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive int, got {out_dim!r}")
        if isinstance(p, bool) or not isinstance(p, int) or p < 2:
            raise ValueError(f"p must be an int >= 2, got {p!r}")
        if not (isinstance(student_temp, (int, float)) and student_temp > 0):
            raise ValueError(f"student_temp must be > 0, got {student_temp!r}")
        self.out_dim, self.p, self.vmf = out_dim, p, bool(vmf)
        self.student_temp, self.backend = float(student_temp), backend
        self.center = TeacherCenter(out_dim, centering, center_momentum, backend=backend)

    def _check(self, student_patch_z, teacher_patch_z, masks, student_weight, teacher_weight) -> None:
        for name, x in (("student_patch_z", student_patch_z), ("teacher_patch_z", teacher_patch_z)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3 or x.shape[2] != self.p:
                raise ValueError(f"{name} must be a float tensor [G*B, n, p={self.p}], got "
                                 f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if teacher_patch_z.shape != student_patch_z.shape:
            raise ValueError(f"teacher_patch_z {tuple(teacher_patch_z.shape)} must have the shape of "
                             f"student_patch_z {tuple(student_patch_z.shape)} (same views, same patches)")
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be a bool tensor [G*B, n], got {getattr(masks, 'dtype', type(masks))}")
        if masks.shape != student_patch_z.shape[:2]:
            raise ValueError(f"masks must have shape [G*B, n]={tuple(student_patch_z.shape[:2])}, "
                             f"got {tuple(masks.shape)}")
        check_prototypes(student_weight, "student_weight", self.out_dim, self.p)
        check_prototypes(teacher_weight, "teacher_weight", self.out_dim, self.p)

    def forward(self, student_patch_z: torch.Tensor, teacher_patch_z: torch.Tensor, masks: torch.Tensor,
                student_weight: torch.Tensor, teacher_weight: torch.Tensor, teacher_temp: float):
        self._check(student_patch_z, teacher_patch_z, masks, student_weight, teacher_weight)
        masks = masks.to(student_patch_z.device)
        weights = masked_token_weights(masks)
        n_rows = weights.numel()
        if n_rows == 0:
            return self._no_masked_tokens(student_patch_z, student_weight, masks)

        out = head_to_loss(student_patch_z[masks], teacher_patch_z[masks], student_weight, teacher_weight,
                           student_temp=self.student_temp, teacher_temp=teacher_temp, centering=self.center.mode,
                           center=self.center.state, vmf=self.vmf, same_view=True, row_weight=weights,
                           backend=self.backend)
        self.center.observe(out.center_stat)
        self.center.update()
        dev = out.loss.device
        with torch.no_grad():
            metrics = {"loss_patch": out.loss.detach().float(),
                       "patch_teacher_entropy": out.teacher_entropy.float().mean(),
                       "patch_student_entropy": out.student_entropy.float().mean(),
                       "patch_used_prototypes": used_prototype_count(out.teacher_argmax, self.out_dim),
                       "masked_tokens": torch.tensor(float(n_rows), device=dev),
                       "masked_images": (masks.sum(dim=1) > 0).sum().float(),
                       "mask_ratio": torch.tensor(n_rows / masks.numel(), device=dev)}
        return out.loss, metrics

    def _no_masked_tokens(self, student_patch_z, student_weight, masks):
        """A zero loss that still reaches the student's parameters (DDP expects a gradient for each).

        Under torch.distributed the other ranks all-reduce their center statistic now; this rank joins
        with the current center (for `logit` and `prob` centering the stat lives in the center's space),
        which keeps the collective matched at the cost of a slight pull towards the old center.
        """
        if self.center.mode in ("logit", "prob") and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            self.center.update(self.center.center.clone())
        params = [student_weight] if isinstance(student_weight, torch.Tensor) else list(student_weight)
        loss = (student_patch_z.sum() + sum(w.sum() for w in params)) * 0.0
        # No entropies: there is no distribution to measure (and a 0 would look like collapse).
        zero = torch.zeros((), device=loss.device)
        metrics = {"loss_patch": zero, "patch_used_prototypes": zero, "masked_tokens": zero,
                   "masked_images": zero, "mask_ratio": zero}
        return loss, metrics
