"""Which implementation of the fused loss ops runs: torch (reference), triton, cpp or cuda.

Every backend implements the same two callables with the signatures of `dinovmf.loss.dino_cross_entropy`
and `dinovmf.centering.teacher_distribution` (minus `backend`); see docs/INTERFACES.md.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")
# "auto" tries these in order; torch always runs, so it is the last resort on every device.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

_IMPLS = {
    # name: (module, cross-entropy callable, teacher callable)
    "torch": ("dinovmf.loss", "dino_cross_entropy_reference", "teacher_distribution_reference"),
    "triton": ("dinovmf.kernels.triton_ops", "dino_cross_entropy_triton", "teacher_distribution_triton"),
    "cpp": ("dinovmf._ext", "dino_cross_entropy_cpp", "teacher_distribution_cpp"),
    "cuda": ("dinovmf._ext", "dino_cross_entropy_cuda", "teacher_distribution_cuda"),
}


class BackendUnavailable(RuntimeError):
    """The requested backend is unknown, not built, or cannot run on this device."""


@lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    """None if `module` imports, else the error (cached: a failed import is not retried per call)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure (ImportError, a triton/driver error) means unavailable
        return f"{type(e).__name__}: {e}"
    return None


def _extension_error(backend: str) -> str | None:
    from dinovmf._ext import ExtensionUnavailable, load_extension

    try:
        load_extension(backend)
    except ExtensionUnavailable as e:
        return str(e)
    return None


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """None if `name` can run on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "backend 'triton' needs a CUDA device, and torch.cuda is not available"
        elif device.type == "cpu":
            # On CPU, Triton only runs through its interpreter, which must be on before triton is imported.
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "backend 'triton' runs on CPU only under TRITON_INTERPRET=1 (the interpreter; slow)"
        else:
            return f"backend 'triton' does not run on {device.type}"
        err = _import_error(_IMPLS["triton"][0])
        return None if err is None else f"backend 'triton' cannot be imported ({err})"
    if name == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors only, not {device.type}"
        return _extension_error("cpp")
    if name == "cuda":
        if device.type != "cuda" or not torch.cuda.is_available():
            return "backend 'cuda' needs a CUDA device"
        return _extension_error("cuda")
    return f"unknown backend {name!r}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device`, in `BACKENDS` order."""
    device = torch.device(device)
    return [b for b in BACKENDS if _why_unavailable(b, device) is None]


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """Map "auto" to the fastest backend for `device`; check that an explicit choice can run."""
    device = torch.device(device)
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ("torch",))
        return next(b for b in order if _why_unavailable(b, device) is None)
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    why = _why_unavailable(name, device)
    if why is not None:
        raise BackendUnavailable(f"{why}; available on {device.type}: {available_backends(device)}")
    return name


def _impl(name: str, index: int):
    if name not in _IMPLS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module = _IMPLS[name][0]
    return getattr(importlib.import_module(module), _IMPLS[name][index])


def cross_entropy_impl(name: str):
    """The `dino_cross_entropy(student_logits, teacher_probs)` callable of backend `name`."""
    return _impl(name, 1)


def teacher_impl(name: str):
    """The `teacher_distribution(dots, temp, mode, center, weight_norm, p)` callable of backend `name`."""
    return _impl(name, 2)
