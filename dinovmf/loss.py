"""The DINO / DINO-vMF loss: the PyTorch reference every fused kernel is tested against, and `DINOLoss`.

Pairing (DESIGN §1): teacher view t < T is the student's global view t; every teacher view is paired
with every student view s != t. With `Pbar_s = sum_{t paired with s} P_t` and `n_s` its count, one
student row contributes `n_s * LSE(l_s) - Pbar_s . l_s`, so the loss is

    L = 1 / (|pairs| B) * sum_s sum_b [ n_s LSE(l_s,b) - Pbar_s,b . l_s,b ],   |pairs| = T (S - 1)

(equal to the mean of -sum_k P_t log_softmax(l_s) because teacher rows sum to one). This is the form
the kernels implement: the teacher is summed once per student view and the logits are read twice.
"""
from __future__ import annotations

import torch

from dinovmf import backends
from dinovmf.centering import (TeacherCenter, teacher_distribution,  # noqa: F401 - re-exported
                               teacher_distribution_reference, teacher_temperature)
from dinovmf.kernels.common import check_ce_inputs
from dinovmf.prototypes import koleo_proto_loss
from dinovmf.vmf import vmf_logits


def dino_cross_entropy_reference(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over DINO pairs and batch of -sum_k P_t log_softmax(student_s), vectorised (single-pass form).

    student_logits [S, B, K] (any float dtype; differentiable), teacher_probs [T, B, K] (T <= S, not
    differentiated). Accumulates in float32 (float64 if the logits are float64); returns a 0-d tensor
    of that dtype.
    """
    check_ce_inputs(student_logits, teacher_probs)
    (s, b, _), t = student_logits.shape, teacher_probs.shape[0]
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
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


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       backend: str = "auto") -> torch.Tensor:
    """DINO cross-entropy (see `dino_cross_entropy_reference`) via `backend`: auto/torch/triton/cpp/cuda.

    "auto" picks the fastest backend available on the logits' device; an unknown or unavailable
    backend raises `dinovmf.backends.BackendUnavailable` saying why.
    """
    impl = backends.cross_entropy_impl(backends.resolve_backend(backend, student_logits.device))
    return impl(student_logits, teacher_probs)


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
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    ce = -(teacher_probs.detach().to(acc) * torch.log_softmax(student_logits.to(acc), dim=-1)).sum(dim=-1)
    if weights is None:
        return ce.mean()
    if weights.shape != ce.shape:
        raise ValueError(f"weights must have shape [N]={ce.shape[0]}, got {tuple(weights.shape)}")
    w = weights.detach().to(acc)
    return (w * ce).sum() / w.sum()


def prototype_logits(z: torch.Tensor, weight: torch.Tensor, temp: float, vmf: bool) -> torch.Tensor:
    """Student logits [N, K]: vMF logits (`vmf=True`) or DINO's plain `z @ weight.T / temp`."""
    if vmf:
        return vmf_logits(z, weight, temp)
    if z.dim() != 2 or weight.dim() != 2 or z.shape[1] != weight.shape[1]:
        raise ValueError(f"z [N, p] and weight [K, p] must share p, got {tuple(z.shape)} and {tuple(weight.shape)}")
    return z @ weight.t() / temp


def _mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum p log p (0 log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1).mean()


class DINOLoss(torch.nn.Module):
    """From head outputs to the DINO (`vmf=False`) or DINO-vMF (`vmf=True`) loss.

    forward(student_z [S*B, p], teacher_z [T*B, p], student_weight [K, p], teacher_weight [K, p],
    teacher_temp, n_global=T) -> (loss, metrics). Rows are unit vectors, view-major. The teacher side
    is computed without grad from the teacher prototypes (their norms give the teacher's vMF bias);
    the student side differentiates through `student_z` and `student_weight`. The center is updated
    after the loss is computed. `koleo_weight > 0` adds KoLeo-proto on the student prototypes.

    Metrics (Python floats, one host sync for all): loss, loss_ce, loss_koleo (0.0 when not computed,
    i.e. koleo_weight == 0: it costs K^2 p), teacher_entropy, student_entropy (mean row entropies),
    teacher_used_prototypes (prototypes that are the argmax of >= 1 teacher row in this local batch),
    kappa_min / kappa_mean / kappa_max of the student prototypes (||w_k|| / student_temp). The O(K^2 p)
    `prototypes.prototype_utilisation` is left to the trainer's periodic evaluation.
    """

    def __init__(self, out_dim: int, p: int = 256, vmf: bool = True, student_temp: float = 0.1,
                 centering: str = "logit", center_momentum: float = 0.9, koleo_weight: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        if not (isinstance(student_temp, (int, float)) and student_temp > 0):
            raise ValueError(f"student_temp must be > 0, got {student_temp!r}")
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight!r}")
        self.out_dim, self.p, self.vmf = out_dim, p, vmf
        self.student_temp, self.koleo_weight, self.backend = float(student_temp), float(koleo_weight), backend
        self.center = TeacherCenter(out_dim, centering, center_momentum, backend=backend)

    def student_logits(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[N, K] student logits; the iBOT patch loss reuses this on patch rows."""
        return prototype_logits(z, weight, self.student_temp, self.vmf)

    @torch.no_grad()
    def teacher_probs(self, z: torch.Tensor, weight: torch.Tensor, temp: float,
                      center: TeacherCenter | None = None) -> torch.Tensor:
        """[N, K] teacher probabilities through `center` (default: this loss's own), not yet updated."""
        center = self.center if center is None else center
        weight_norm = torch.linalg.vector_norm(weight.float(), dim=1) if self.vmf else None
        return center(z @ weight.t(), temp, weight_norm, self.p)

    def _check_shapes(self, student_z, teacher_z, student_weight, teacher_weight, n_global) -> tuple[int, int, int]:
        for name, x in (("student_z", student_z), ("teacher_z", teacher_z)):
            if x.dim() != 2 or x.shape[1] != self.p:
                raise ValueError(f"{name} must be [rows, p={self.p}], got {tuple(x.shape)}")
        for name, w in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
            if w.shape != (self.out_dim, self.p):
                raise ValueError(f"{name} must be [K={self.out_dim}, p={self.p}], got {tuple(w.shape)}")
        if not isinstance(n_global, int) or n_global < 1:
            raise ValueError(f"n_global must be a positive int, got {n_global!r}")
        if teacher_z.shape[0] % n_global:
            raise ValueError(f"teacher_z rows ({teacher_z.shape[0]}) must be n_global={n_global} views of B")
        b = teacher_z.shape[0] // n_global
        if b == 0 or student_z.shape[0] % b:
            raise ValueError(f"student_z rows ({student_z.shape[0]}) must be a multiple of B={b}")
        return student_z.shape[0] // b, n_global, b

    def forward(self, student_z: torch.Tensor, teacher_z: torch.Tensor, student_weight: torch.Tensor,
                teacher_weight: torch.Tensor, teacher_temp: float, n_global: int):
        s, t, b = self._check_shapes(student_z, teacher_z, student_weight, teacher_weight, n_global)
        logits = self.student_logits(student_z, student_weight)  # [S*B, K]
        probs = self.teacher_probs(teacher_z, teacher_weight, teacher_temp)  # [T*B, K]
        loss_ce = dino_cross_entropy(logits.view(s, b, -1), probs.view(t, b, -1), backend=self.backend)
        if self.koleo_weight > 0:
            loss_koleo = koleo_proto_loss(student_weight)
            loss = loss_ce + self.koleo_weight * loss_koleo
        else:
            loss_koleo = torch.zeros((), device=loss_ce.device)
            loss = loss_ce
        self.center.update()

        with torch.no_grad():
            kappa = torch.linalg.vector_norm(student_weight.detach().float(), dim=1) / self.student_temp
            stats = torch.stack([
                loss.detach().float(), loss_ce.detach().float(), loss_koleo.detach().float(),
                _mean_entropy(probs.float()),
                _mean_entropy(torch.softmax(logits.detach().float(), dim=-1)),
                kappa.min(), kappa.mean(), kappa.max(),
                # = used_prototypes(probs), kept on device so that all metrics cost one host sync.
                torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1]).gt(0).sum().float(),
            ]).tolist()
        names = ("loss", "loss_ce", "loss_koleo", "teacher_entropy", "student_entropy",
                 "kappa_min", "kappa_mean", "kappa_max", "teacher_used_prototypes")
        return loss, dict(zip(names, stats))


__all__ = ["dino_cross_entropy", "dino_cross_entropy_reference", "teacher_distribution",
           "teacher_distribution_reference", "TeacherCenter", "teacher_temperature", "DINOLoss",
           "patch_cross_entropy", "prototype_logits", "koleo_proto_loss"]
