"""The teacher side of DINO: centering modes, the teacher row reference, and the EMA center.

The teacher's raw score is `r = dots * col_scale + temp * bias` (dots = z @ v.T with the per-prototype
column scale `c_k = g_k / ||v_k||` of weight-normed prototypes, or z @ W.T with no scale; bias =
`vmf_column_bias`, absent for plain DINO), so that `r / temp` are the vMF logits and a plain-DINO `r` is
exactly what DINO's head outputs (docs/INTERFACES.md). Modes:

* `logit` (DINO):      probs = softmax((r - center) / temp),  stat = mean_rows(r)
* `prob` (DINO-vMF):   s = softmax(r / temp), probs = normalise_rows(s / center),  stat = mean_rows(s)
* `none`:              probs = softmax(r / temp)
* `sinkhorn` (DINOv2): 3 Sinkhorn-Knopp iterations on exp(r / temp) over the global batch

`teacher_rows_reference` is the PyTorch reference of the `teacher_rows` kernel every backend implements
(float32, or float64 when the dots are float64); it also returns each row's entropy and argmax, the
by-products the loss turns into metrics. The teacher temperature itself comes from
`dinovmf.schedules` (the teacher-temperature warm-up schedule).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dinovmf import backends
from dinovmf.kernels.common import (CENTERING_MODES, SINKHORN_ITERATIONS, check_mode, check_teacher_inputs,
                                    check_teacher_rows_inputs, sinkhorn_knopp)
from dinovmf.vmf import vmf_column_bias

__all__ = ["CENTERING_MODES", "SINKHORN_ITERATIONS", "TeacherCenter", "row_entropy", "sinkhorn_reference",
           "teacher_bias", "teacher_distribution", "teacher_distribution_reference", "teacher_rows_reference"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum_k p log p per row (0 log 0 = 0): the one entropy helper of the host code."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def teacher_bias(weight_norm: torch.Tensor | None, temp: float, p: int | None) -> torch.Tensor | None:
    """The teacher's vMF column bias [K] (float64 for float64 norms, else float32), computed once per
    step from the prototype norms and no gradient; None without norms (plain DINO)."""
    if weight_norm is None:
        return None
    if p is None:
        raise ValueError("p (the bottleneck dim) is required when weight_norm is given")
    acc = torch.float64 if weight_norm.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        return vmf_column_bias(weight_norm.detach().double(), temp, p).to(acc)


@torch.no_grad()
def sinkhorn_reference(scores: torch.Tensor, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp (`sinkhorn_knopp_teacher`: columns to 1/K, rows to 1/N_global, `iterations`
    times, then rows to 1) on `exp(scores)` [N, K], over the global batch: the backends' log-space iteration
    (`kernels.common.sinkhorn_knopp`) with plain torch reductions, in the dtype of `scores`."""
    x = scores
    return sinkhorn_knopp(row_lse=lambda a: torch.logsumexp(x + a, dim=1),
                          col_lse=lambda v: torch.logsumexp(x + v.to(x.dtype)[:, None], dim=0),
                          row_softmax=lambda a: torch.softmax(x + a, dim=1), N=x.shape[0], K=x.shape[1],
                          device=x.device, iterations=iterations)


@torch.no_grad()
def teacher_rows_reference(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None = None,
                           col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                           out: torch.Tensor | None = None):
    """PyTorch reference of the `teacher_rows` kernel (docs/INTERFACES.md, Backends).

    `r = dots * col_scale + temp * bias`, then the mode of the module docstring. Returns (probs [N,K],
    stat [K] or None, row_entropy [N], row_argmax [N] int64); probs are written to `out` when given (it
    may alias `dots`). Float32 arithmetic, float64 when `dots` are float64.
    """
    check_teacher_rows_inputs(dots, temp, mode, center, col_scale, bias, out)
    temp = float(temp)
    acc = torch.float64 if dots.dtype == torch.float64 else torch.float32
    r = dots.detach().to(acc)
    if col_scale is not None:
        r = r * col_scale.to(acc)
    if bias is not None:
        r = r + temp * bias.to(acc)
    stat = None
    if mode == "logit":
        probs, stat = torch.softmax((r - center.to(acc)) / temp, dim=1), r.mean(dim=0)
    elif mode == "prob":
        # normalise_rows(softmax(l) / c) == softmax(l - log c): same thing, without underflow.
        probs = torch.softmax(r / temp - torch.log(center.to(acc)), dim=1)
        stat = torch.softmax(r / temp, dim=1).mean(dim=0)
    elif mode == "none":
        probs = torch.softmax(r / temp, dim=1)
    else:
        probs = sinkhorn_reference(r / temp)
    entropy, argmax = row_entropy(probs), probs.argmax(dim=1)
    if out is not None:
        probs = out.copy_(probs)
    return probs, stat, entropy, argmax


def teacher_distribution_reference(dots: torch.Tensor, temp: float, mode: str,
                                   center: torch.Tensor | None = None,
                                   weight_norm: torch.Tensor | None = None,
                                   p: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference of the teacher distribution: `(probs [N,K], stat [K] or None)`, float32
    (float64 for float64 dots).

    dots [N,K] = teacher z @ W.T; `center` [K] is required for `logit` and `prob`; `weight_norm` [K]
    (with `p`) adds the vMF column bias. `stat` is the *local* batch statistic the EMA center is
    updated with (the caller all-reduces it); None for `sinkhorn` and `none`. See the module docstring.
    """
    check_teacher_inputs(dots, temp, mode, center, weight_norm, p)
    bias = teacher_bias(weight_norm, temp, p)
    if bias is not None and dots.dtype == torch.float64:
        bias = bias.double()
    probs, stat, _, _ = teacher_rows_reference(dots, temp, mode, center, None, bias)
    return probs, stat


def teacher_distribution(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None = None,
                         weight_norm: torch.Tensor | None = None, p: int | None = None,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher probabilities [N,K] fp32 and center statistic via `backend`'s `teacher_rows` kernel (see
    `teacher_distribution_reference`); the vMF bias is computed once here, on the host, in float64."""
    check_teacher_inputs(dots, temp, mode, center, weight_norm, p)
    impl = backends.teacher_rows_impl(backends.resolve_backend(backend, dots.device))
    bias = teacher_bias(weight_norm, temp, p)
    probs, stat, _, _ = impl(dots.detach(), float(temp), mode, center, None,
                             None if bias is None else bias.float(), None)
    return probs, stat


class TeacherCenter(torch.nn.Module):
    """The EMA center of `logit` / `prob` centering, plus the call into `teacher_distribution`.

    `forward(dots, temp, weight_norm=None, p=None) -> probs` remembers the batch statistic and, under
    torch.distributed, starts its all-reduce asynchronously (as DINOv2 does) so that the reduction
    overlaps the student's loss; `update()` waits for it and applies
    `center <- momentum * center + (1 - momentum) * mean_over_ranks(stat)`. For `sinkhorn` / `none`
    there is no state and `update` does nothing.
    """

    def __init__(self, K: int, mode: str, momentum: float = 0.9, backend: str = "auto"):
        super().__init__()
        check_mode(mode)
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"K must be a positive int, got {K!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.mode, self.momentum, self.backend = mode, float(momentum), backend
        # logit: subtracting 0 is no centering; prob: dividing by the uniform 1/K is no centering.
        init = {"logit": 0.0, "prob": 1.0 / K}.get(mode, 0.0)
        self.register_buffer("center", torch.full((K,), init, dtype=torch.float32))
        self._pending: torch.Tensor | None = None
        self._pending_work = None
        # A context manager factory around the wait for the all-reduce: the trainer times it as
        # communication (`dinovmf.step_timing`), since with a slow rank this is where the others wait.
        self.comm_timer = contextlib.nullcontext

    @property
    def state(self) -> torch.Tensor | None:
        """The center a teacher kernel needs for this mode (the EMA buffer), or None (sinkhorn, none)."""
        return self.center if self.mode in ("logit", "prob") else None

    def forward(self, dots: torch.Tensor, temp: float, weight_norm: torch.Tensor | None = None,
                p: int | None = None) -> torch.Tensor:
        probs, stat = teacher_distribution(dots, temp, self.mode, self.state, weight_norm, p, backend=self.backend)
        self.observe(stat)
        return probs

    def observe(self, stat: torch.Tensor | None) -> None:
        """Remember a batch statistic for the next `update()`, starting its all-reduce (asynchronously)."""
        if stat is None or self.mode not in ("logit", "prob"):
            return
        self._pending = stat.detach().float()
        self._pending_work = dist.all_reduce(self._pending, async_op=True) if _distributed() else None

    @torch.no_grad()
    def update(self, stat: torch.Tensor | None = None) -> None:
        """Fold a batch statistic into the EMA: `stat` if given (all-reduced here), else the last one given
        to `observe` (by `forward` or by the fused loss), whose all-reduce is already under way."""
        if self.mode not in ("logit", "prob"):
            return
        if stat is not None:
            stat = stat.detach().float().clone()
            if _distributed():
                with self.comm_timer():
                    dist.all_reduce(stat)
        else:
            if self._pending is None:
                raise RuntimeError("update() without a stat needs a forward() or observe(stat) first")
            stat = self._pending
            if self._pending_work is not None:
                with self.comm_timer():
                    self._pending_work.wait()
            self._pending, self._pending_work = None, None
        if _distributed():
            stat /= dist.get_world_size()
        if stat.shape != self.center.shape:
            raise ValueError(f"stat must have shape {tuple(self.center.shape)}, got {tuple(stat.shape)}")
        self.center.mul_(self.momentum).add_(stat.to(self.center.device), alpha=1.0 - self.momentum)
