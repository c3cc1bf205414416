"""Which implementation of the fused loss ops runs: torch (reference), triton, cpp or cuda.

Every backend implements the same two callables with the signatures of `dinovmf.loss.dino_cross_entropy`
and `dinovmf.centering.teacher_distribution` (minus `backend`); see docs/INTERFACES.md.
"""
from __future__ import annotations

import importlib

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")


class BackendUnavailable(RuntimeError):
    """The requested backend is unknown, not built, or cannot run on this device."""


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """None if `name` can run on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    return f"backend {name!r} is not implemented yet"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if _why_unavailable(b, device) is None]


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """Map "auto" to the fastest backend for `device`; check that an explicit choice can run."""
    device = torch.device(device)
    if name == "auto":
        order = ("cuda", "triton", "cpp", "torch") if device.type == "cuda" else ("cpp", "torch")
        return next(b for b in order if _why_unavailable(b, device) is None)
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    why = _why_unavailable(name, device)
    if why is not None:
        raise BackendUnavailable(f"{why}; available on {device.type}: {available_backends(device)}")
    return name


_IMPLS = {
    # name: (module, cross-entropy callable, teacher callable)
    "torch": ("dinovmf.loss", "dino_cross_entropy_reference", "teacher_distribution_reference"),
}


def cross_entropy_impl(name: str):
    mod, ce, _ = _IMPLS[name]
    return getattr(importlib.import_module(mod), ce)


def teacher_impl(name: str):
    mod, _, teacher = _IMPLS[name]
    return getattr(importlib.import_module(mod), teacher)
