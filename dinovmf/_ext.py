"""The compiled C++ CPU extension `dinovmf._C` behind the "cpp" backend: loading with a clear error, and
the backend's two contract callables `ce_rows_cpp` / `teacher_rows_cpp` (docs/INTERFACES.md, Backends)
on top of the extension's ops `ce_rows`, `teacher_rows` and `column_lse` (csrc/dino_loss_cpu.cpp), and the
k-major twins the fused op runs on the CPU in fp32, `ce_cols_cpp` / `teacher_cols_cpp`
(csrc/dino_loss_kmajor.cpp; why k-major: that file's header).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from dinovmf.kernels.common import (check_ce_rows_inputs, check_teacher_rows_inputs, check_visit_inner,
                                    finish_teacher_stat, serial_vector_math, sinkhorn_knopp, teacher_column_terms)

EXTENSION = "dinovmf._C"
_BUILD_HINT = "build it with `make install` or `python setup.py build_ext --inplace` in the repository root"


class ExtensionUnavailable(ImportError):
    """The compiled extension is not built or cannot be loaded; the message says why and how to build it."""


@lru_cache(maxsize=None)
def load_extension():
    """Import `dinovmf._C`, or raise ExtensionUnavailable saying how to build it."""
    try:
        return importlib.import_module(EXTENSION)
    except ImportError as e:
        raise ExtensionUnavailable(f"cannot import {EXTENSION} ({e}); {_BUILD_HINT}") from e


def ce_rows_cpp(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight, grad_scale,
                grad_out, col_grad_sum, *, visit_inner: int = 1):
    """`ce_rows` on the CPU (see docs/INTERFACES.md): stats [4, c] fp32; the gradient goes to `grad_out`.
    `visit_inner` (the contract's visiting-order hint) is checked; the C++ loops keep their own order."""
    check_ce_rows_inputs(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight,
                         grad_out, col_grad_sum)
    check_visit_inner(visit_inner, logits.shape[0])

    def f32(x):
        return None if x is None else x.float().contiguous()

    with torch.profiler.record_function("dinovmf::ce_rows_cpp"):
        return load_extension().ce_rows(logits, f32(col_scale), f32(bias), teacher_probs.float().contiguous(),
                                        row_index, int(B), int(T), bool(same_view), f32(row_weight),
                                        float(grad_scale), grad_out, col_grad_sum)


def teacher_rows_cpp(dots, temp, mode, center=None, col_scale=None, bias=None, out=None):
    """`teacher_rows` on the CPU: (probs [N,K] fp32, stat [K] or None, row_entropy [N], row_argmax [N])."""
    check_teacher_rows_inputs(dots, temp, mode, center, col_scale, bias, out)
    with torch.profiler.record_function("dinovmf::teacher_rows_cpp"):
        return _teacher_rows(load_extension(), dots, temp, mode, center, col_scale, bias, out)


def _teacher_rows(ext, dots, temp, mode, center, col_scale, bias, out):
    d = dots.contiguous()
    N, K = d.shape
    with serial_vector_math(d.device):
        a, b, stat_kind, stat_weight = teacher_column_terms(temp, mode, center, col_scale, bias, K, d.device)
    probs = out if out is not None else torch.empty(N, K, dtype=torch.float32, device=d.device)
    if mode == "sinkhorn":
        def rows(shift, write):
            return ext.teacher_rows(d, a, (b + shift).contiguous(), probs if write else None, 0, None)

        _, entropy, argmax, _ = sinkhorn_knopp(row_lse=lambda shift: rows(shift, False)[0],
                                               col_lse=lambda v: ext.column_lse(d, a, b, v.float().contiguous()),
                                               row_softmax=lambda shift: rows(shift, True), N=N, K=K, device=d.device)
        return probs, None, entropy, argmax
    _, entropy, argmax, stat = ext.teacher_rows(d, a, b, probs, stat_kind, stat_weight)
    return probs, finish_teacher_stat(stat, temp, mode, center), entropy, argmax


def kmajor_lanes() -> int:
    """The lane multiple of the k-major kernels' [K, C] matrices (the SIMD width they run with)."""
    return load_extension().kmajor_lanes()


def ce_cols_cpp(logits_t, col_scale, bias, teacher_probs_t, row0: int, n_rows: int, B: int, T: int,
                same_view: bool, row_weight, grad_scale: float, write_grad: bool, col_grad_sum):
    """The k-major student chunk (csrc/dino_loss_kmajor.cpp, `ce_cols`): stats [4, n_rows]; logits_t [K, C]
    is overwritten (with G * col_scale when write_grad, and col_grad_sum += G's column sums)."""
    with torch.profiler.record_function("dinovmf::ce_cols_cpp"):
        return load_extension().ce_cols(logits_t, col_scale, bias, teacher_probs_t, row0, n_rows, B, T, same_view,
                                        row_weight, grad_scale, write_grad, col_grad_sum)


def teacher_cols_cpp(dots_t, n_rows: int, temp, mode, center=None, col_scale=None, bias=None):
    """`teacher_rows` on k-major dots [K, C] (lanes from n_rows on are padding), in place: (probs_t [K, C]
    (= dots_t), stat [K] or None, row_entropy [n_rows], row_argmax [n_rows]). Sinkhorn runs the row-major
    kernels on a transposed copy (its iterations are not written k-major)."""
    ext = load_extension()
    K = dots_t.shape[0]
    with torch.profiler.record_function("dinovmf::teacher_cols_cpp"):
        if mode == "sinkhorn":
            rows = dots_t[:, :n_rows].t().contiguous()
            probs, stat, entropy, argmax = _teacher_rows(ext, rows, temp, mode, center, col_scale, bias, rows)
            dots_t[:, :n_rows].copy_(probs.t())
            return dots_t, stat, entropy, argmax
        with serial_vector_math(dots_t.device):
            a, b, stat_kind, stat_weight = teacher_column_terms(temp, mode, center, col_scale, bias, K, dots_t.device)
        _, entropy, argmax, stat = ext.teacher_cols(dots_t, n_rows, a, b, stat_kind, stat_weight)
        return dots_t, finish_teacher_stat(stat, temp, mode, center), entropy, argmax


def weight_norm_backward_cpp(u: torch.Tensor, v: torch.Tensor, v_norm: torch.Tensor) -> torch.Tensor:
    """In place over [K, p] in one pass: u_k <- u_k - (u_k . v_k / v_norm_k^2) v_k; returns u_k . v_k [K]
    (float32 CPU tensors; see `dinovmf.head_loss.weight_norm_backward_`)."""
    with torch.profiler.record_function("dinovmf::weight_norm_backward_cpp"):
        return load_extension().weight_norm_backward_(u, v.contiguous(), v_norm.float().contiguous())
