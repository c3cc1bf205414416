"""The loss's building blocks per backend: forward+backward time and peak extra memory.

Two per-logits ops (each a backend's row kernel under the host code; the whole head-to-loss path is
bench/bench_head_loss.py), each against (a) the eager PyTorch reference and (b) `torch.compile` of it:
  * ce: `dino_cross_entropy` forward + backward on student logits [S, B, K] and teacher probs [T, B, K]
    (the backends' `ce_rows` kernel);
  * teacher: `teacher_distribution` (logit centering, vMF column bias from the prototype norms, p=256;
    the backends' `teacher_rows` kernel).
The issue's configuration is S=12, T=2, B=64, K=65536; `--k` sweeps K (the plot's x axis). On a GPU
each row also gets the achieved bandwidth (minimal bytes the op must move / time) as a fraction of the
measured device copy bandwidth. Results go to bench/results/loss_ce.{csv,png}, loss_teacher.{csv,png}.

    python -m bench.bench_loss                       # issue config, all backends available here
    python -m bench.bench_loss --k 4096 16384 65536 --no-compile --iters 3
"""
from __future__ import annotations

import argparse
import functools
import math

import torch

from bench.harness import peak_memory, record, timeit
from dinovmf import backends
from dinovmf.centering import teacher_distribution, teacher_distribution_reference
from dinovmf.loss import dino_cross_entropy, dino_cross_entropy_reference

P_DIM = 256


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a `nbytes` buffer)."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * nbytes / (ms * 1e-3)


def make_inputs(S: int, T: int, B: int, K: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(S, B, K, generator=g) * 3).to(device=device, dtype=dtype)
    probs = torch.softmax(torch.randn(T, B, K, generator=g) * 3, dim=-1).to(device)
    dots = torch.randn(T * B, K, generator=g).clamp_(-1, 1).to(device=device, dtype=dtype)
    weight_norm = (torch.rand(K, generator=g) + 0.5).to(device)
    center = (torch.randn(K, generator=g) * 0.1).to(device)
    return logits, probs, dots, weight_norm, center


def ce_step(ce_fn, logits: torch.Tensor, probs: torch.Tensor):
    """One forward + backward; returns a closure for the timers."""
    def step():
        x = logits.detach().requires_grad_()
        ce_fn(x, probs).backward()
        return x.grad
    return step


def ce_min_bytes(logits: torch.Tensor, probs: torch.Tensor) -> int:
    # forward reads logits + teacher; backward reads them again and writes the gradient
    return 3 * logits.numel() * logits.element_size() + 2 * probs.numel() * probs.element_size()


def teacher_min_bytes(dots: torch.Tensor) -> int:
    # read dots, write fp32 probs (the second read of a row is a cache hit in the fused kernels)
    return dots.numel() * dots.element_size() + dots.numel() * 4


def implementations(device: torch.device, compile_ref: bool):
    """(label, ce callable, teacher callable) for every backend that can run on `device`."""
    out = [("torch-eager", dino_cross_entropy_reference, teacher_distribution_reference)]
    if compile_ref:
        out.append(("torch-compile", torch.compile(dino_cross_entropy_reference),
                    torch.compile(teacher_distribution_reference)))
    for name in backends.available_backends(device):
        if name == "torch" or (name == "triton" and device.type == "cpu"):
            continue  # the Triton interpreter on CPU is a correctness tool, not a backend to time
        out.append((name, functools.partial(dino_cross_entropy, backend=name),
                    functools.partial(teacher_distribution, backend=name)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--S", type=int, default=12)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[65536])
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    temp = 0.04
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else math.nan
    ce_rows, teacher_rows = [], []
    impls = implementations(device, compile_ref=not args.no_compile)
    for K in args.k:
        logits, probs, dots, weight_norm, center = make_inputs(args.S, args.T, args.B, K, dtype, device)
        base = dict(S=args.S, T=args.T, B=args.B, K=K, dtype=args.dtype)
        eager = {}
        for label, ce_fn, teacher_fn in impls:
            step = ce_step(ce_fn, logits, probs)
            ms = timeit(step, warmup=args.warmup, iters=args.iters)
            eager.setdefault("ce", ms)
            row = dict(base, backend=label, ms=ms, speedup_vs_eager=eager["ce"] / ms,
                       peak_extra_mb=peak_memory(step, device) / 2**20,
                       logits_mb=logits.numel() * 4 / 2**20)
            if device.type == "cuda":
                row["bw_frac_of_copy"] = ce_min_bytes(logits, probs) / (ms * 1e-3) / copy_bw
            ce_rows.append(row)

            def teach():
                return teacher_fn(dots, temp, "logit", center, weight_norm, P_DIM)
            ms = timeit(teach, warmup=args.warmup, iters=args.iters)
            eager.setdefault("teacher", ms)
            row = dict(base, backend=label, ms=ms, speedup_vs_eager=eager["teacher"] / ms,
                       peak_extra_mb=peak_memory(teach, device) / 2**20)
            if device.type == "cuda":
                row["bw_frac_of_copy"] = teacher_min_bytes(dots) / (ms * 1e-3) / copy_bw
            teacher_rows.append(row)
    shape = f"S={args.S} T={args.T} B={args.B} {args.dtype}"
    record("loss_ce", ce_rows, x="K", y="ms", group="backend", logx=True, logy=True,
           title=f"DINO cross-entropy fwd+bwd ({shape})", device=device)
    record("loss_teacher", teacher_rows, x="K", y="ms", group="backend", logx=True, logy=True,
           title=f"teacher distribution, logit centering + vMF bias ({shape})", device=device)


if __name__ == "__main__":
    main()
