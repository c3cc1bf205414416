"""Benchmark: `log_vmf_normalizer` on 65536 float32 kappas vs the scipy route, accuracy vs mpmath.

    python -m bench.bench_vmf_normalizer [--n 65536] [--iters 10]

Implementations timed per dimension p:
  * dinovmf fwd fp32      log_vmf_normalizer (float64 inside, float32 out) on the benchmark device
  * dinovmf fwd+bwd fp32  the same plus the backward (-A_p) a training step needs
  * dinovmf fwd fp64      float64 in and out (the accuracy the float64 core reaches)
  * scipy ive fp64        nu log k - (p/2) log 2pi - (log ive(nu, k) + k), numpy on the CPU: the usual
                          "exponentially scaled Bessel" trick (not usable inside a training step: host only)
Accuracy: max |error| / max(1, |value|) against mpmath (40 digits) on a log-spaced subsample, and the number of
non-finite outputs over all kappas (ive underflows to 0 for large nu and small kappa).
"""
from __future__ import annotations

import argparse
import functools

import mpmath
import numpy as np
import scipy.special
import torch

from bench.harness import record, timeit
from dinovmf.vmf import log_vmf_normalizer

DIMS = (3, 16, 64, 256, 1024, 4096)
KAPPA_RANGE = (1e-3, 1e5)


@functools.lru_cache(maxsize=None)
def _mpmath_log_c(p: int, kappa: float) -> float:
    nu = mpmath.mpf(p) / 2 - 1
    with mpmath.workdps(40):
        log_i = mpmath.log(mpmath.besseli(nu, mpmath.mpf(kappa), maxterms=10**6))
        return float(nu * mpmath.log(kappa) - mpmath.mpf(p) / 2 * mpmath.log(2 * mpmath.pi) - log_i)


def scipy_log_vmf_normalizer(kappa: np.ndarray, p: int) -> np.ndarray:
    """log C_p via scipy.special.ive in float64: log I_nu(k) = log(ive(nu, k)) + k."""
    nu = p / 2 - 1
    with np.errstate(divide="ignore"):
        log_i = np.log(scipy.special.ive(nu, kappa)) + kappa
    return nu * np.log(kappa) - 0.5 * p * np.log(2 * np.pi) - log_i


def _max_scaled_error(values: np.ndarray, reference: np.ndarray) -> float:
    """max |value - reference| / max(1, |reference|): the issue's float32 accuracy measure (log C_p
    reaches ~1e5 in magnitude, where float32 rounding alone is ~4e-3 absolute)."""
    err = np.abs(values.astype(np.float64) - reference) / np.maximum(1.0, np.abs(reference))
    return float(np.max(np.where(np.isfinite(err), err, np.inf)))


def run(n: int = 65536, iters: int = 10, accuracy_points: int = 25, device: str | None = None) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kappa32 = torch.logspace(np.log10(KAPPA_RANGE[0]), np.log10(KAPPA_RANGE[1]), n, dtype=torch.float32)
    kappa_dev = kappa32.to(device)
    kappa_np = kappa32.double().numpy()
    sub = np.unique(np.linspace(0, n - 1, accuracy_points).astype(int))
    rows = []
    for p in DIMS:
        want = np.array([_mpmath_log_c(p, float(kappa_np[i])) for i in sub])

        ours = log_vmf_normalizer(kappa_dev, p).cpu().numpy()
        ms_fwd = timeit(lambda: log_vmf_normalizer(kappa_dev, p), warmup=3, iters=iters)
        kappa_dev64 = kappa_dev.double()
        ours64 = log_vmf_normalizer(kappa_dev64, p).cpu().numpy()
        ms_fwd64 = timeit(lambda: log_vmf_normalizer(kappa_dev64, p), warmup=3, iters=iters)

        kappa_grad = kappa_dev.clone().requires_grad_()
        ms_fwd_bwd = timeit(lambda: log_vmf_normalizer(kappa_grad, p).sum().backward(), warmup=3, iters=iters)

        theirs = scipy_log_vmf_normalizer(kappa_np, p)
        ms_scipy = timeit(lambda: scipy_log_vmf_normalizer(kappa_np, p), warmup=1, iters=max(3, iters // 4),
                          sync=False)

        common = {"p": p, "n": n}
        rows += [
            {**common, "impl": "dinovmf fwd fp32", "ms": ms_fwd,
             "max_scaled_err": _max_scaled_error(ours[sub], want), "nonfinite": int((~np.isfinite(ours)).sum())},
            {**common, "impl": "dinovmf fwd+bwd fp32", "ms": ms_fwd_bwd,  # same forward values as above
             "max_scaled_err": _max_scaled_error(ours[sub], want), "nonfinite": int((~np.isfinite(ours)).sum())},
            {**common, "impl": "dinovmf fwd fp64", "ms": ms_fwd64,
             "max_scaled_err": _max_scaled_error(ours64[sub], want), "nonfinite": int((~np.isfinite(ours64)).sum())},
            {**common, "impl": "scipy ive fp64 (host)", "ms": ms_scipy,
             "max_scaled_err": _max_scaled_error(theirs[sub], want), "nonfinite": int((~np.isfinite(theirs)).sum())},
        ]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536, help="number of float32 kappas")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    rows = run(args.n, args.iters, device=args.device)
    record("vmf_normalizer", rows, x="p", y="ms", group="impl", logx=True, logy=True,
           title=f"log C_p on {args.n} float32 kappas in [1e-3, 1e5]",
           device=args.device)


if __name__ == "__main__":
    main()
