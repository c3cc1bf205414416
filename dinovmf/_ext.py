"""The compiled fused-loss extensions (`dinovmf._C` for CPU, `dinovmf._C_cuda` for CUDA) behind the
"cpp" and "cuda" backends: loading with clear errors, autograd wrappers and the teacher driver.

Both extensions expose the same four ops (csrc/dino_loss_cpu.cpp, csrc/dino_loss_cuda.cu):
`ce_forward`, `ce_backward`, `teacher_rows`, `column_lse`.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from dinovmf.kernels.common import (check_ce_inputs, check_teacher_inputs, pair_count, precomputed_column_bias,
                                    sinkhorn_knopp, MIN_P_IN_KERNEL_BIAS)

EXTENSIONS = {"cpp": "dinovmf._C", "cuda": "dinovmf._C_cuda"}
_MODE_IDS = {"none": 0, "logit": 1, "prob": 2}
_MODE_SHIFT = 3
_BUILD_HINT = "build it with `make install` or `python setup.py build_ext --inplace` in the repository root"


class ExtensionUnavailable(ImportError):
    """A compiled extension is not built or cannot be loaded; the message says why and how to build it."""


@lru_cache(maxsize=None)
def load_extension(backend: str):
    """Import the extension module of `backend` ("cpp" or "cuda"), or raise ExtensionUnavailable."""
    if backend not in EXTENSIONS:
        raise ValueError(f"backend must be one of {tuple(EXTENSIONS)}, got {backend!r}")
    name = EXTENSIONS[backend]
    if backend == "cuda" and torch.version.cuda is None:
        raise ExtensionUnavailable(f"{name} needs a CUDA build of torch; this torch is {torch.__version__}")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ExtensionUnavailable(f"cannot import {name} ({e}); {_BUILD_HINT}"
                                   + (" on a machine with nvcc and a CUDA torch" if backend == "cuda" else "")) from e


class _ExtCrossEntropy(torch.autograd.Function):
    """Forward saves the inputs (no copies) and two floats per row; backward is one pass over the logits."""

    @staticmethod
    def forward(ctx, ext, student_logits, teacher_probs):
        S, B, _ = student_logits.shape
        logits, probs = student_logits.contiguous(), teacher_probs.contiguous()
        row_loss, row_lse, row_psum = ext.ce_forward(logits, probs)
        ctx.ext = ext
        ctx.scale = 1.0 / (pair_count(S, teacher_probs.shape[0]) * B)
        ctx.save_for_backward(logits, probs, row_lse, row_psum)
        return row_loss.sum() * ctx.scale

    @staticmethod
    def backward(ctx, grad_out):
        logits, probs, row_lse, row_psum = ctx.saved_tensors
        grad = ctx.ext.ce_backward(logits, probs, row_lse, row_psum, grad_out.float().reshape(1), ctx.scale)
        return None, grad, None


def _cross_entropy(backend: str, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    check_ce_inputs(student_logits, teacher_probs)
    return _ExtCrossEntropy.apply(load_extension(backend), student_logits, teacher_probs.detach())


def _teacher(backend: str, dots, temp, mode, center=None, weight_norm=None, p=None):
    check_teacher_inputs(dots, temp, mode, center, weight_norm, p)
    ext = load_extension(backend)
    d = dots.contiguous()
    N, K = d.shape
    # p < 32: the Debye expansion is not accurate enough, so the bias comes from dinovmf.vmf (float64).
    bias = None
    if weight_norm is not None and p < MIN_P_IN_KERNEL_BIAS:
        bias, weight_norm = precomputed_column_bias(weight_norm, temp, p), None
    p_arg = float(p) if p is not None else 0.0
    if mode == "sinkhorn":
        def rows(shift, write_probs):
            return ext.teacher_rows(d, float(temp), _MODE_SHIFT, None, shift, weight_norm, bias, p_arg,
                                    write_probs, not write_probs)

        probs = sinkhorn_knopp(row_lse=lambda a: rows(a, False)[2],
                               col_lse=lambda v: ext.column_lse(d, float(temp), v, weight_norm, bias, p_arg),
                               row_softmax=lambda a: rows(a, True)[0], N=N, K=K, device=d.device)
        return probs, None
    probs, stat, _ = ext.teacher_rows(d, float(temp), _MODE_IDS[mode], center, None, weight_norm, bias, p_arg,
                                      True, False)
    return probs, (stat if mode in ("logit", "prob") else None)


def dino_cross_entropy_cpp(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """`dino_cross_entropy` on the C++ CPU extension (see docs/INTERFACES.md)."""
    return _cross_entropy("cpp", student_logits, teacher_probs)


def teacher_distribution_cpp(dots, temp, mode, center=None, weight_norm=None, p=None):
    """`teacher_distribution` on the C++ CPU extension (see docs/INTERFACES.md)."""
    return _teacher("cpp", dots, temp, mode, center, weight_norm, p)


def dino_cross_entropy_cuda(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """`dino_cross_entropy` on the CUDA extension (see docs/INTERFACES.md)."""
    return _cross_entropy("cuda", student_logits, teacher_probs)


def teacher_distribution_cuda(dots, temp, mode, center=None, weight_norm=None, p=None):
    """`teacher_distribution` on the CUDA extension (see docs/INTERFACES.md)."""
    return _teacher("cuda", dots, temp, mode, center, weight_norm, p)
