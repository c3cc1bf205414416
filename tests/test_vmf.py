"""dinovmf.vmf against mpmath (the oracle), exact gradients, and argument checks."""
import functools
import math

import mpmath
import numpy as np
import pytest
import torch

from dinovmf.vmf import (bessel_ratio, log_bessel_iv, log_vmf_normalizer, vmf_column_bias,
                         vmf_logits)

# p spans the small-order recurrence route (nu < 32), the switch-over region, and pure Debye.
DIMS = [3, 4, 5, 8, 16, 31, 32, 33, 64, 65, 66, 67, 256, 1024, 4096]
# 30 log-spaced kappas over [1e-3, 1e5], rounded to float32 so that the float64 and float32 tests share
# one set of (slow at p = 4096) mpmath values; 1e-3 moves by 5e-11 relative, 1e5 is exact.
KAPPAS = np.logspace(-3, 5, 30).astype(np.float32).astype(np.float64)


@functools.lru_cache(maxsize=None)
def _mp_log_iv(nu: float, kappa: float) -> mpmath.mpf:
    # maxterms: around kappa ~ 3e4-5e4 with nu ~ 2000, mpmath's series needs more than its default.
    with mpmath.workdps(40):
        return mpmath.log(mpmath.besseli(mpmath.mpf(nu), mpmath.mpf(kappa), maxterms=10**6))


def _oracle(p: int, kappas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log I_nu, log C_p, A_p) at each kappa (taken exactly as the given float), nu = p/2 - 1."""
    nu = p / 2 - 1
    log_iv, log_c, ratio = [], [], []
    for k in kappas:
        k = float(k)
        li, li1 = _mp_log_iv(nu, k), _mp_log_iv(nu + 1, k)
        with mpmath.workdps(40):
            log_c.append(float(nu * mpmath.log(k) - mpmath.mpf(p) / 2 * mpmath.log(2 * mpmath.pi) - li))
            ratio.append(float(mpmath.exp(li1 - li)))
        log_iv.append(float(li))
    return np.array(log_iv), np.array(log_c), np.array(ratio)


@pytest.mark.parametrize("p", DIMS)
def test_float64_matches_mpmath(p):
    kappa = torch.tensor(KAPPAS, dtype=torch.float64)
    want_iv, want_c, want_ratio = _oracle(p, KAPPAS)
    got_iv = log_bessel_iv(p / 2 - 1, kappa).numpy()
    got_c = log_vmf_normalizer(kappa, p).numpy()
    got_ratio = bessel_ratio(kappa, p).numpy()
    assert np.isfinite(got_iv).all() and np.isfinite(got_c).all()
    np.testing.assert_allclose(got_iv, want_iv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_c, want_c, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_ratio, want_ratio, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", DIMS)
def test_gradient_is_minus_bessel_ratio(p):
    kappa = torch.tensor(KAPPAS, dtype=torch.float64, requires_grad=True)
    value = log_vmf_normalizer(kappa, p)
    value.sum().backward()
    # The no-grad route (which skips the ratio) gives the same values.
    torch.testing.assert_close(value.detach(), log_vmf_normalizer(kappa.detach(), p), rtol=0, atol=0)
    _, _, want_ratio = _oracle(p, KAPPAS)
    np.testing.assert_allclose(-kappa.grad.numpy(), want_ratio, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [3, 16, 256, 4096])
def test_float32_within_1e5_of_max_one_value(p):
    kappa32 = torch.tensor(KAPPAS, dtype=torch.float32)
    want_iv, want_c, want_ratio = _oracle(p, KAPPAS)  # KAPPAS are float32 values: no input rounding
    for got, want in ((log_bessel_iv(p / 2 - 1, kappa32), want_iv), (log_vmf_normalizer(kappa32, p), want_c),
                      (bessel_ratio(kappa32, p), want_ratio)):
        assert got.dtype == torch.float32
        err = np.abs(got.double().numpy() - want)
        assert (err <= 1e-5 * np.maximum(1.0, np.abs(want))).all(), err.max()


def test_half_order_closed_form():
    # I_{1/2}(k) = sqrt(2 / (pi k)) sinh(k): an independent check of the recurrence route at p = 3.
    kappa = torch.tensor([1e-3, 0.5, 3.0, 40.0, 700.0], dtype=torch.float64)
    want = 0.5 * torch.log(2 / (math.pi * kappa)) + kappa + torch.log(-torch.expm1(-2 * kappa)) - math.log(2)
    torch.testing.assert_close(log_bessel_iv(0.5, kappa), want, rtol=0, atol=1e-8)  # measured 3e-10


def test_non_half_integer_order_and_p2():
    kappa = torch.tensor([1e-3, 0.7, 9.0, 1e3], dtype=torch.float64)
    for nu in (0.0, 0.3, 7.25, 60.9):
        want = [float(_mp_log_iv(nu, float(k))) for k in kappa]
        np.testing.assert_allclose(log_bessel_iv(nu, kappa).numpy(), want, rtol=0, atol=1e-6)
    assert torch.isfinite(log_vmf_normalizer(kappa, 2)).all()


def test_finite_over_whole_range_and_shape_kept():
    kappa = torch.logspace(-3, 5, 512, dtype=torch.float32).reshape(8, 4, 16)
    for p in (3, 256, 4096):
        out = log_vmf_normalizer(kappa, p)
        assert out.shape == kappa.shape and torch.isfinite(out).all()
        assert torch.isfinite(log_bessel_iv(2047.0, kappa)).all()
        ratio = bessel_ratio(kappa, p)
        assert ((ratio > 0) & (ratio < 1)).all()


def test_gradcheck_float64():
    kappa = torch.tensor([0.01, 0.9, 12.0, 300.0, 5e4], dtype=torch.float64, requires_grad=True)
    for p in (3, 32, 256):
        assert torch.autograd.gradcheck(lambda k: log_vmf_normalizer(k, p), (kappa,))
        assert torch.autograd.gradcheck(lambda k: log_bessel_iv(p / 2 - 1, k), (kappa,))


def _unit_rows(n, p, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(n, p, dtype=dtype), dim=1)


def test_vmf_logits_definition(seed):
    p, temp = 16, 0.1
    z, w = _unit_rows(5, p), torch.randn(7, p, dtype=torch.float64) * 2
    norms = w.norm(dim=1)
    want = z @ w.T / temp + log_vmf_normalizer(norms / temp, p) - log_vmf_normalizer(torch.tensor([1 / temp],
                                                                                                dtype=torch.float64), p)
    torch.testing.assert_close(vmf_logits(z, w, temp), want)
    torch.testing.assert_close(vmf_column_bias(norms, temp, p), want[0] - z[0] @ w.T / temp)


def test_float32_column_bias_keeps_precision_near_unit_norm(seed):
    # log C_256(10) ~ 344, where a float32 ulp is 3e-5; the offset must be removed before rounding.
    norms64 = 1 + 0.01 * torch.randn(64, dtype=torch.float64)
    want = vmf_column_bias(norms64, 0.1, 256)
    got = vmf_column_bias(norms64.float(), 0.1, 256)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_vmf_logits_gradcheck_float64(seed):
    z = _unit_rows(4, 6).requires_grad_()
    w = torch.randn(5, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, w: vmf_logits(z, w, 0.1), (z, w))


def test_weight_gradient_is_minus_ratio_along_prototype(seed):
    # d log C_p(||w||/tau) / d w = -A_p(kappa) w / (||w|| tau)   (DESIGN §1)
    p, temp = 32, 0.1
    w = torch.randn(6, p, dtype=torch.float64, requires_grad=True)
    vmf_column_bias(w.norm(dim=1), temp, p).sum().backward()
    norms = w.detach().norm(dim=1)
    _, _, ratio = _oracle(p, (norms / temp).numpy())
    want = -torch.from_numpy(ratio)[:, None] * w.detach() / (norms[:, None] * temp)
    torch.testing.assert_close(w.grad, want, rtol=1e-6, atol=0)


def test_unit_prototypes_reduce_to_plain_dino(seed):
    z, w = _unit_rows(5, 12), _unit_rows(9, 12)
    torch.testing.assert_close(vmf_logits(z, w, 0.1), z @ w.T / 0.1, rtol=0, atol=1e-12)
    # With equal norms != 1 the vMF logits differ from plain ones only by a constant.
    diff = vmf_logits(z, 3 * w, 0.1) - 3 * z @ w.T / 0.1
    torch.testing.assert_close(diff, torch.full_like(diff, diff[0, 0].item()))
    assert abs(diff[0, 0].item()) > 1  # and the constant is not trivially zero


@pytest.mark.parametrize("fn, args, name", [
    (log_vmf_normalizer, (torch.tensor([1.0]), 1), "p"),
    (log_vmf_normalizer, (torch.tensor([1.0]), 3.5), "p"),
    (bessel_ratio, (torch.tensor([1.0]), 0), "p"),
    (log_vmf_normalizer, (torch.tensor([1.0, 0.0]), 8), "kappa"),
    (log_vmf_normalizer, (torch.tensor([-1.0]), 8), "kappa"),
    (log_vmf_normalizer, (torch.tensor([float("nan")]), 8), "kappa"),
    (log_vmf_normalizer, (torch.tensor([1, 2]), 8), "kappa"),
    (bessel_ratio, (torch.tensor([1, 2]), 8), "kappa"),
    (log_bessel_iv, (-1.0, torch.tensor([1.0])), "nu"),
    (log_bessel_iv, (1.0, torch.tensor([0.0])), "kappa"),
    (vmf_logits, (torch.randn(3, 4), torch.randn(5, 6), 0.1), "weight"),
    (vmf_logits, (torch.randn(3, 4), torch.randn(5, 4), 0.0), "temp"),
    (vmf_logits, (torch.ones(3, 4, dtype=torch.long), torch.randn(5, 4), 0.1), "z"),
    (vmf_logits, (torch.randn(3, 4), torch.ones(5, 4, dtype=torch.int32), 0.1), "weight"),
    (vmf_column_bias, (torch.ones(2, 3), 0.1, 8), "weight_norm"),
])
def test_bad_arguments_raise_value_error_naming_them(fn, args, name):
    with pytest.raises(ValueError, match=name):
        fn(*args)


@pytest.mark.parametrize("p", [256, 7])  # Debye directly (nu >= 30) and through the order recurrence
def test_blocked_evaluation_gives_the_single_pass_numbers(p, monkeypatch):
    """Large inputs are evaluated in blocks (memory); the values and gradients are those of one pass."""
    import dinovmf.vmf as vmf
    kappa = torch.logspace(-3, 5, 3 * 4 * 7, dtype=torch.float64).view(3, 4, 7).requires_grad_()
    def evaluate(block):
        monkeypatch.setattr(vmf, "_BLOCK", block)
        out = log_vmf_normalizer(kappa, p)
        (grad,) = torch.autograd.grad(out.sum(), kappa)
        with torch.no_grad():  # no ratio needed: the one-order path
            return out, grad, log_bessel_iv(p / 2 - 1, kappa)

    blocked = evaluate(10)  # 84 elements: 9 blocks, the last one short
    single = evaluate(10 ** 9)
    assert blocked[0].shape == kappa.shape
    for a, b in zip(blocked, single):
        assert torch.equal(a, b)
