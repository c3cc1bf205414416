"""Which implementation of the two fused row kernels runs: torch (reference), cpp or triton.

Every backend implements the same two callables (docs/INTERFACES.md, Backends; the contract of the
fused head-to-loss op):

* `ce_rows(logits, col_scale, bias, teacher_probs, row_index, B, T, same_view, row_weight, grad_scale,
  grad_out, col_grad_sum) -> stats [4, c]` — the student side of a chunk of rows;
* `teacher_rows(dots, temp, mode, center, col_scale, bias, out) -> (probs, stat, row_entropy, row_argmax)`.

Everything else (the head-to-loss op, `dino_cross_entropy`, `teacher_distribution`) is host code on top
of these two, shared by all backends.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton", "cpp")
# "auto" tries these in order; torch always runs, so it is the last resort on every device.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}

_IMPLS = {
    # name: ((module, ce_rows callable), (module, teacher_rows callable))
    "torch": (("dinovmf.loss_reference", "ce_rows_reference"), ("dinovmf.centering", "teacher_rows_reference")),
    "triton": (("dinovmf.kernels.triton_ops", "ce_rows_triton"), ("dinovmf.kernels.triton_ops", "teacher_rows_triton")),
    "cpp": (("dinovmf._ext", "ce_rows_cpp"), ("dinovmf._ext", "teacher_rows_cpp")),
}


class BackendUnavailable(RuntimeError):
    """The requested backend is unknown, not built, or cannot run on this device."""


@lru_cache(maxsize=None)
def _import_error(name: str) -> str | None:
    """None if backend `name`'s modules import and have both entry points, else why not (cached)."""
    for module, entry_point in _IMPLS[name]:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any failure (ImportError, a triton/driver error) means unavailable
            return f"{type(e).__name__}: {e}"
        if not hasattr(mod, entry_point):
            return f"{module} has no {entry_point}"
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
    elif name == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors only, not {device.type}"
        from dinovmf._ext import ExtensionUnavailable, load_extension
        try:
            load_extension()
        except ExtensionUnavailable as e:
            return str(e)
    else:
        return f"unknown backend {name!r}"
    err = _import_error(name)
    return None if err is None else f"backend {name!r} cannot be loaded ({err})"


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
    module, entry_point = _IMPLS[name][index]
    return getattr(importlib.import_module(module), entry_point)


def ce_rows_impl(name: str):
    """The `ce_rows` callable of backend `name` (see the module docstring)."""
    return _impl(name, 0)


def teacher_rows_impl(name: str):
    """The `teacher_rows` callable of backend `name` (see the module docstring)."""
    return _impl(name, 1)
