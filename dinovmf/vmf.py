"""The von Mises-Fisher normalizer and the vMF logits of DINO-vMF (DESIGN §1).

    C_p(kappa) = kappa^nu / ((2 pi)^(p/2) I_nu(kappa)),   nu = p/2 - 1
    d log C_p / d kappa = -A_p(kappa),   A_p = I_{p/2} / I_{p/2-1}

How log I_nu(kappa) is computed (float64 inside, whatever the input dtype: these are K values per
training step, so the cost is small next to the [N, K] logits, and nothing overflows or underflows):

* For orders >= `_DEBYE_MIN_ORDER` the uniform asymptotic (Debye) expansion with U1..U4 is accurate
  to ~1e-9 absolute uniformly in kappa (DLMF 10.41.3).
* For a smaller order nu, evaluate Debye at M = nu + m (the first order >= `_DEBYE_MIN_ORDER` with the
  same fractional part) and at M + 1, then walk down to nu with the three-term recurrence written
  for ratios, rho_n = I_{n+1}/I_n:

      I_{n-1} / I_n = rho_n + 2n/kappa        (DLMF 10.29.1)
      log I_{n-1}  = log I_n + log(rho_n + 2n/kappa),    rho_{n-1} = 1 / (rho_n + 2n/kappa)

  Downward recurrence is the stable direction for I (Miller): an error in rho_n reaches rho_{n-1}
  multiplied by -rho_{n-1}^2, |rho| < 1, so the starting error is damped or at worst alternates.
  Every factor is > 1 and of moderate size, so nothing overflows for kappa in [1e-3, 1e5] (nor far
  beyond: finite from 1e-36 to 1e8 and more).

The walk also yields rho_nu = I_{nu+1}/I_nu, which is exactly the gradient we need: A_p = rho_{p/2-1}
and d log I_nu / d kappa = rho_nu + nu / kappa. The autograd Functions below return these directly, so
gradients are the exact derivative of the true function, not autograd through the approximation.

Bad arguments raise ValueError naming the argument. The kappa > 0 value check runs on CPU tensors
only: on a GPU it would cost a host sync per training step, so there kappa <= 0 gives NaN instead.
"""
from __future__ import annotations

import functools
import math

import torch

# Lowest order at which the Debye expansion (U1..U4) is used directly. Measured against mpmath over
# p in 2..4096, kappa in [1e-3, 1e5]: max error 6e-10 in log I and 4e-11 relative in A_p with 32
# (2e-9 with 24, 1e-5 with 4). Each unit of order below it costs one recurrence step (3 elementwise ops).
_DEBYE_MIN_ORDER = 32.0

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------
# Argument checks: ValueError naming the argument (these functions sit under user-facing code).
# --------------------------------------------------------------------------------------------------
def _check_float_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_positive(kappa: torch.Tensor, name: str = "kappa") -> None:
    """ValueError unless every value is > 0. Checked for CPU tensors only: on a GPU the check would
    cost a host sync every training step; there a kappa <= 0 yields NaN, which the trainer's
    non-finite-loss guard reports."""
    _check_float_tensor(kappa, name)
    if kappa.device.type != "cpu" or torch.compiler.is_compiling():  # a data-dependent branch breaks the graph
        return
    if kappa.numel() and not bool((kappa > 0).all()):
        bad = kappa[~(kappa > 0)].flatten()[:3].tolist()
        raise ValueError(f"{name} must be > 0 (and not NaN) everywhere; found values like {bad}")


def _check_dim(p, name: str = "p") -> int:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p != int(p):
        raise ValueError(f"{name} must be an integer dimension, got {p!r}")
    if p < 2:
        raise ValueError(f"{name} must be >= 2 (the sphere S^(p-1) needs p >= 2), got {p}")
    return int(p)


def _check_order(nu) -> float:
    if isinstance(nu, bool) or not isinstance(nu, (int, float)) or not math.isfinite(nu) or nu < 0:
        raise ValueError(f"nu must be a finite Python float >= 0, got {nu!r}")
    return float(nu)


# --------------------------------------------------------------------------------------------------
# The float64 core
# --------------------------------------------------------------------------------------------------
def debye_series(t, nu: float):
    """1 + U1(t)/nu + ... + U4(t)/nu^4 (DLMF 10.41.10), Horner in t^2: the one float64 Debye helper of the
    host code (`_log_iv_debye` here, the reference terms in `dinovmf.kernels.common`). `t` a Python float
    or a float64 tensor (t = 1/sqrt(1 + (kappa/nu)^2))."""
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 + t2 * (-462.0 + t2 * 385.0)) / 1152.0
    u3 = t * t2 * (30375.0 + t2 * (-369603.0 + t2 * (765765.0 + t2 * -425425.0))) / 414720.0
    u4 = t2 * t2 * (4465125.0 + t2 * (-94121676.0 + t2 * (349922430.0 + t2 * (-446185740.0
                                                                                + t2 * 185910725.0)))) / 39813120.0
    inv = 1.0 / nu
    return 1.0 + inv * (u1 + inv * (u2 + inv * (u3 + inv * u4)))


def _log_iv_debye(nu, kappa: torch.Tensor) -> torch.Tensor:
    """log I_nu(kappa) by the Debye expansion with U1..U4; nu >= ~30 (a float, or a float64 tensor that
    broadcasts against kappa: several orders in one pass of elementwise ops), kappa float64 > 0."""
    z = kappa / nu
    s = torch.sqrt(1.0 + z * z)
    # z / (1 + s) instead of z / s - ...: no cancellation for small or large z.
    eta = s + torch.log(z / (1.0 + s))
    log_2pi_nu = torch.log(2.0 * math.pi * nu) if isinstance(nu, torch.Tensor) else math.log(2.0 * math.pi * nu)
    return nu * eta - 0.5 * log_2pi_nu - 0.5 * torch.log(s) + torch.log(debye_series(1.0 / s, nu))


# Elements per evaluation: the Debye terms hold ~14 float64 temporaries of the batched [2, n] shape at once
# (14 MiB for K = 65536 prototypes, most of the fused op's memory beyond its buffers); blocks keep them ~2 MiB.
_BLOCK = 8192


def _log_iv_and_ratio(nu: float, kappa: torch.Tensor,
                      need_ratio: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log I_nu(kappa), I_{nu+1}(kappa) / I_nu(kappa)) for float64 kappa > 0; see the module docstring.

    With `need_ratio=False` and nu >= `_DEBYE_MIN_ORDER` (the usual p = 256 case) the second Debye
    evaluation is skipped and the ratio is None: that is what a no-grad caller (the teacher) needs.
    Evaluated in blocks of `_BLOCK` elements (elementwise maths: the same numbers as one pass).
    """
    if kappa.numel() <= _BLOCK:
        return _log_iv_and_ratio_block(nu, kappa, need_ratio)
    parts = [_log_iv_and_ratio_block(nu, block, need_ratio) for block in kappa.reshape(-1).split(_BLOCK)]
    log_i = torch.cat([log_i for log_i, _ in parts]).view(kappa.shape)
    return log_i, None if parts[0][1] is None else torch.cat([rho for _, rho in parts]).view(kappa.shape)


def _log_iv_and_ratio_block(nu: float, kappa: torch.Tensor,
                            need_ratio: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_log_iv_and_ratio` in one batched evaluation."""
    steps = max(0, math.ceil(_DEBYE_MIN_ORDER - nu))
    top = nu + steps
    if steps == 0 and not need_ratio:
        return _log_iv_debye(top, kappa), None
    # Orders top and top + 1 in one batched evaluation (half the elementwise calls of two).
    orders = torch.tensor([top, top + 1.0], dtype=kappa.dtype, device=kappa.device).view((2,) + (1,) * kappa.dim())
    log_i, log_i_next = _log_iv_debye(orders, kappa.unsqueeze(0))
    # rho_top = exp(log I_{top+1} - log I_top): the difference of two large logs loses only
    # |log I| * 2^-52 ~ 1e-11 absolute at kappa = 1e5, i.e. 1e-11 relative in rho.
    rho = torch.exp(log_i_next - log_i)
    log_i = log_i.clone()  # a view of the batched result; the recurrence below updates it in place
    two_over_kappa = 2.0 / kappa
    # Multiply the factors I_{n-1}/I_n (all > 1) and take one log per block of 8 instead of one per
    # step: 3 elementwise ops a step. 8 factors of at most 1 + 66/kappa stay finite in float64 for
    # kappa > 1e-36.
    block = torch.ones_like(kappa)
    for i, j in enumerate(range(steps, 0, -1)):
        step = torch.add(rho, two_over_kappa, alpha=nu + j)  # I_{n-1} / I_n with n = nu + j
        block.mul_(step)
        rho = step.reciprocal_()
        if i % 8 == 7:
            log_i.add_(torch.log(block))
            block.fill_(1.0)
    if steps % 8:
        log_i.add_(torch.log(block))
    return log_i, rho


class _LogBesselIv(torch.autograd.Function):
    """log I_nu(kappa); backward: d/dkappa = I_{nu+1}/I_nu + nu/kappa (DLMF 10.29.2)."""

    @staticmethod
    def forward(ctx, kappa: torch.Tensor, nu: float) -> torch.Tensor:
        k64 = kappa.detach().to(torch.float64)
        log_i, rho = _log_iv_and_ratio(nu, k64, need_ratio=ctx.needs_input_grad[0])
        if rho is not None:
            ctx.save_for_backward((rho + nu / k64).to(kappa.dtype))
        return log_i.to(kappa.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (dlog_i,) = ctx.saved_tensors
        return grad_out * dlog_i, None


class _LogVmfNormalizer(torch.autograd.Function):
    """log C_p(kappa) - offset; backward is exactly -A_p(kappa) * grad_out.

    The constant `offset` is subtracted in float64, before the cast to kappa's dtype: log C_p is ~344
    at p = 256, kappa = 10, where one float32 ulp is already 3e-5.
    """

    @staticmethod
    def forward(ctx, kappa: torch.Tensor, p: int, offset: float = 0.0) -> torch.Tensor:
        nu = p / 2.0 - 1.0
        k64 = kappa.detach().to(torch.float64)
        log_i, ratio = _log_iv_and_ratio(nu, k64, need_ratio=ctx.needs_input_grad[0])
        if ratio is not None:
            ctx.save_for_backward(ratio.to(kappa.dtype))
        log_c = nu * torch.log(k64) - (0.5 * p * _LOG_2PI + offset) - log_i
        return log_c.to(kappa.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (ratio,) = ctx.saved_tensors
        return -ratio * grad_out, None, None


# --------------------------------------------------------------------------------------------------
# Public API (docs/INTERFACES.md)
# --------------------------------------------------------------------------------------------------
def log_bessel_iv(nu: float, kappa: torch.Tensor) -> torch.Tensor:
    """log I_nu(kappa), elementwise, for a float32/float64 tensor `kappa` > 0 of any shape.

    `nu` is a Python float >= 0. Computed in float64 and cast back to `kappa.dtype`; finite for
    kappa in [1e-3, 1e5] and nu up to 2047 (and well beyond). Differentiable in `kappa` with the exact
    derivative I_{nu+1}/I_nu + nu/kappa.
    """
    nu = _check_order(nu)
    _check_positive(kappa, "kappa")
    return _LogBesselIv.apply(kappa, nu)


def bessel_ratio(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa), the mean resultant length of a vMF in R^p.

    In (0, 1); ~kappa/p for small kappa and ~1 - (p-1)/(2 kappa) for large kappa. Not differentiable
    (it is the gradient, not something we train through).
    """
    p = _check_dim(p)
    _check_positive(kappa, "kappa")
    _, ratio = _log_iv_and_ratio(p / 2.0 - 1.0, kappa.detach().to(torch.float64))
    return ratio.to(kappa.dtype)


def log_vmf_normalizer(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """log C_p(kappa) = nu log kappa - (p/2) log(2 pi) - log I_nu(kappa), nu = p/2 - 1.

    Elementwise over a float32/float64 tensor `kappa` > 0; float64 inside. The gradient is exactly
    -A_p(kappa) (a custom autograd Function; no autograd through the approximation).
    """
    p = _check_dim(p)
    _check_positive(kappa, "kappa")
    return _LogVmfNormalizer.apply(kappa, p)


def vmf_column_bias(weight_norm: torch.Tensor, temp: float, p: int) -> torch.Tensor:
    """Per-prototype vMF logit offset `log C_p(||w_k|| / temp) - log C_p(1 / temp)`, shape [K].

    The subtracted `log C_p(1/temp)` is common to all prototypes (it cancels in every softmax) and
    keeps the offset small: log C_p itself is about +344 at p=256, kappa=10, which would cost fp32/bf16
    logits most of their precision. It is exactly 0 for unit-norm prototypes (plain DINO).
    Differentiable in `weight_norm` with the exact gradient -A_p(kappa_k) / temp.
    """
    _check_float_tensor(weight_norm, "weight_norm")
    if weight_norm.dim() != 1:
        raise ValueError(f"weight_norm must be 1-D [K], got shape {tuple(weight_norm.shape)}")
    if not (isinstance(temp, (int, float)) and temp > 0 and math.isfinite(temp)):
        raise ValueError(f"temp must be a finite float > 0, got {temp!r}")
    p = _check_dim(p)
    _check_positive(weight_norm, "weight_norm")
    return _LogVmfNormalizer.apply(weight_norm / temp, p, _log_vmf_normalizer_at(1.0 / temp, p))


@functools.lru_cache(maxsize=64)
@torch._dynamo.assume_constant_result  # a function of Python numbers: torch.compile bakes the value in
def _log_vmf_normalizer_at(kappa: float, p: int) -> float:
    """log C_p(kappa) for one host value, as a Python float (cached: the offset of `vmf_column_bias` is
    the same every step for a fixed temperature, and computing it costs ~40 small tensor ops)."""
    return log_vmf_normalizer(torch.tensor([kappa], dtype=torch.float64), p).item()


def vmf_logits(z: torch.Tensor, weight: torch.Tensor, temp: float) -> torch.Tensor:
    """vMF mixture logits [N, K] = z @ weight.T / temp + log C_p(||w_k|| / temp) - log C_p(1 / temp).

    z: [N, p] unit rows (not checked: normalising is the head's job); weight: [K, p] unnormalised
    prototypes, so mu_k = w_k/||w_k|| and kappa_k = ||w_k||/temp. The constant -log C_p(1/temp) is
    common to all logits and cancels in every softmax (see `vmf_column_bias`). Gradients w.r.t. `z`
    and `weight` are exact (the norm is differentiated by autograd, log C_p by its exact -A_p).
    """
    _check_float_tensor(z, "z")
    _check_float_tensor(weight, "weight")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [N, p], got shape {tuple(z.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [K, p], got shape {tuple(weight.shape)}")
    if z.shape[1] != weight.shape[1]:
        raise ValueError(f"z and weight must share the last dim p, got z {tuple(z.shape)} "
                         f"and weight {tuple(weight.shape)}")
    bias = vmf_column_bias(torch.linalg.vector_norm(weight, dim=1), temp, weight.shape[1])
    return z @ weight.t() / temp + bias
