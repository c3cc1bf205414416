"""The teacher side of DINO: centering modes, the EMA center, and the teacher temperature schedule.

The teacher's raw score is `r = dots + temp * bias`, dots = z @ W.T and bias = `vmf_column_bias`
(absent for plain DINO), so that `r / temp` are the vMF logits and a plain-DINO `r` is exactly what
DINO's head outputs (docs/INTERFACES.md). Modes:

* `logit` (DINO):      probs = softmax((r - center) / temp),  stat = mean_rows(r)
* `prob` (DINO-vMF):   s = softmax(r / temp), probs = normalise_rows(s / center),  stat = mean_rows(s)
* `none`:              probs = softmax(r / temp)
* `sinkhorn` (DINOv2): 3 Sinkhorn-Knopp iterations on exp(r / temp) over the global batch

Everything here is computed in float32 (or float64 if the dots are float64): the teacher is never
differentiated, and its probabilities are the targets every kernel is tested against.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dinovmf import backends
from dinovmf.vmf import vmf_column_bias

CENTERING_MODES = ("logit", "prob", "sinkhorn", "none")
SINKHORN_ITERATIONS = 3


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_mode(mode: str) -> None:
    if mode not in CENTERING_MODES:
        raise ValueError(f"mode must be one of {CENTERING_MODES}, got {mode!r}")


def _check_temp(temp, name: str = "temp") -> float:
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {temp!r}")
    return float(temp)


def _raw_scores(dots: torch.Tensor, temp: float, weight_norm: torch.Tensor | None, p: int | None) -> torch.Tensor:
    """r = dots + temp * vmf_column_bias(weight_norm), in float32 (float64 if dots are float64)."""
    acc = torch.float64 if dots.dtype == torch.float64 else torch.float32
    r = dots.to(acc)
    if weight_norm is not None:
        if p is None:
            raise ValueError("p (the bottleneck dim) is required when weight_norm is given")
        if weight_norm.shape != (dots.shape[1],):
            raise ValueError(f"weight_norm must have shape [K]={dots.shape[1]}, got {tuple(weight_norm.shape)}")
        r = r + temp * vmf_column_bias(weight_norm.detach().to(acc), temp, p)
    return r


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Balanced assignment of N rows to K columns from `exp(scores)`, over the global batch.

    As DINOv2's `sinkhorn_knopp_teacher`: alternately make every column sum to 1/K and every row sum to
    1/N_global, `iterations` times, then scale rows to sum to 1. Column sums (and the global max used to
    keep exp() finite, and the total) are all-reduced when torch.distributed is initialised, so every
    rank gets its rows of the globally balanced plan.
    """
    shift = scores.max()
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp(scores - shift)  # a common factor cancels in the first normalisation
    n_global = q.shape[0] * (dist.get_world_size() if _distributed() else 1)
    k = q.shape[1]
    total = q.sum()
    if _distributed():
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        col = q.sum(dim=0, keepdim=True)
        if _distributed():
            dist.all_reduce(col)
        q /= col * k
        q /= q.sum(dim=1, keepdim=True) * n_global
    return q * n_global


def teacher_distribution_reference(dots: torch.Tensor, temp: float, mode: str,
                                   center: torch.Tensor | None = None,
                                   weight_norm: torch.Tensor | None = None,
                                   p: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference of the teacher distribution: `(probs [N,K] fp32, stat [K] fp32 or None)`.

    dots [N,K] = teacher z @ W.T; `center` [K] is required for `logit` and `prob`; `weight_norm` [K]
    (with `p`) adds the vMF column bias. `stat` is the *local* batch statistic the EMA center is
    updated with (the caller all-reduces it); None for `sinkhorn` and `none`. See the module docstring.
    """
    _check_mode(mode)
    temp = _check_temp(temp)
    if not isinstance(dots, torch.Tensor) or not dots.is_floating_point() or dots.dim() != 2:
        raise ValueError(f"dots must be a 2-D floating-point tensor [N, K], got "
                         f"{getattr(dots, 'dtype', type(dots))} {tuple(getattr(dots, 'shape', ()))}")
    with torch.no_grad():
        r = _raw_scores(dots.detach(), temp, weight_norm, p)
        if mode in ("logit", "prob"):
            if center is None:
                raise ValueError(f"center is required for mode {mode!r}")
            if center.shape != (r.shape[1],):
                raise ValueError(f"center must have shape [K]={r.shape[1]}, got {tuple(center.shape)}")
            c = center.to(r.dtype)
        if mode == "logit":
            return torch.softmax((r - c) / temp, dim=1), r.mean(dim=0)
        if mode == "prob":
            logits = r / temp
            # normalise_rows(softmax(l) / c) == softmax(l - log c): same thing, without underflow.
            probs = torch.softmax(logits - torch.log(c), dim=1)
            return probs, torch.softmax(logits, dim=1).mean(dim=0)
        if mode == "none":
            return torch.softmax(r / temp, dim=1), None
        return sinkhorn_knopp(r / temp), None


def teacher_distribution(dots: torch.Tensor, temp: float, mode: str, center: torch.Tensor | None = None,
                         weight_norm: torch.Tensor | None = None, p: int | None = None,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher probabilities and center statistic via the chosen backend (see `teacher_distribution_reference`)."""
    impl = backends.teacher_impl(backends.resolve_backend(backend, dots.device))
    return impl(dots, temp, mode, center, weight_norm, p)


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
        _check_mode(mode)
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

    def forward(self, dots: torch.Tensor, temp: float, weight_norm: torch.Tensor | None = None,
                p: int | None = None) -> torch.Tensor:
        center = self.center if self.mode in ("logit", "prob") else None
        probs, stat = teacher_distribution(dots, temp, self.mode, center, weight_norm, p, backend=self.backend)
        if stat is not None:
            self._pending = stat.detach().float()
            self._pending_work = dist.all_reduce(self._pending, async_op=True) if _distributed() else None
        return probs

    @torch.no_grad()
    def update(self, stat: torch.Tensor | None = None) -> None:
        """Fold a batch statistic into the EMA: `stat` if given (all-reduced here), else the last forward's."""
        if self.mode not in ("logit", "prob"):
            return
        if stat is not None:
            stat = stat.detach().float().clone()
            if _distributed():
                dist.all_reduce(stat)
        else:
            if self._pending is None:
                raise RuntimeError("update() without a stat needs a forward() first")
            stat = self._pending
            if self._pending_work is not None:
                self._pending_work.wait()
            self._pending, self._pending_work = None, None
        if _distributed():
            stat /= dist.get_world_size()
        if stat.shape != self.center.shape:
            raise ValueError(f"stat must have shape {tuple(self.center.shape)}, got {tuple(stat.shape)}")
        self.center.mul_(self.momentum).add_(stat.to(self.center.device), alpha=1.0 - self.momentum)


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher temperature: linear from `start` at step 0 to `end` at `warmup_steps`, then flat at `end`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    _check_temp(start, "start")
    _check_temp(end, "end")
    if step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * step / warmup_steps)
