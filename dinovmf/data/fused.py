"""The fused augmentation: one pass per crop on the CPU (C++) or the GPU (Triton), and the multi-crop batch.

`fused_augment(images, params)` is `augment.augment_reference` in one kernel: uint8 [N, H, W, 3]
(the decoders' layout) or float [N, 3, H, W] crops and their parameter rows (`augment_params`) in,
normalised float32 [N, 3, H, W] out, on the device of `images`:
- CPU: `torch.ops.dinovmf.augment_crops` (csrc/augment_cpu.cpp: SIMD, parallel over the crops);
- CUDA: `dinovmf.kernels.augment.augment_crops_triton` (kernels/augment.py).
On a CPU device the loaders' workers apply the C++ kernel per image (FFCV's threads through its C entry
point, the PIL workers through this function; see `loader.MultiCropLoader`). `MultiCropAugmentation`
applies it to a multi-crop batch on the training device (a GPU), where the workers hand over uint8
crops and parameters.
"""
from __future__ import annotations

import torch

from . import augment_params as P
from .augment import IMAGENET_MEAN, IMAGENET_STD, augment_reference, to_float_nchw

# Instruction sets of the C++ kernel (csrc/augment_cpu.cpp): -1 picks the widest the CPU has.
CPU_ISAS = {"auto": -1, "baseline": 0, "avx2": 1, "avx512": 2}


def load_cpu_op():
    """`torch.ops.dinovmf.augment_crops`, loading the dinovmf._C extension that registers it."""
    from dinovmf._ext import load_extension
    load_extension()
    return torch.ops.dinovmf.augment_crops


def fused_unavailable(device: torch.device | str) -> str | None:
    """None if `fused_augment` runs on `device`, else why not (the C++ extension is not built; triton
    does not import)."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            import dinovmf.kernels.augment  # noqa: F401
        elif device.type == "cpu":
            load_cpu_op()
        else:
            return f"no fused augmentation for {device.type} devices"
    except ImportError as e:  # ExtensionUnavailable is an ImportError
        return f"{type(e).__name__}: {e}"
    return None


def cpu_isa_supported(isa: str) -> bool:
    """Whether this CPU runs the C++ kernel's `isa` path (a key of CPU_ISAS)."""
    load_cpu_op()
    return isa == "auto" or bool(torch.ops.dinovmf.augment_has_isa(CPU_ISAS[isa]))


def _check(images: torch.Tensor, params: torch.Tensor) -> None:
    u8 = images.dtype == torch.uint8
    if images.dim() != 4 or (images.shape[3] != 3 if u8 else images.shape[1] != 3) or not (
            u8 or images.is_floating_point()):
        raise ValueError(f"images must be uint8 [N, H, W, 3] or float [N, 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if params.dim() != 2 or params.shape != (images.shape[0], P.NUM_PARAMS):
        raise ValueError(f"params must be [N={images.shape[0]}, {P.NUM_PARAMS}] (augment_params.PARAM_NAMES), "
                         f"got {tuple(params.shape)}")


def fused_augment(images: torch.Tensor, params: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  isa: str = "auto") -> torch.Tensor:
    """Augmented, normalised float32 [N, 3, H, W] crops on the device of `images` (see the module doc).

    `params` [N, NUM_PARAMS] is moved to that device; `isa` picks the C++ kernel's vector path
    (tests and benchmarks; see CPU_ISAS).
    """
    _check(images, params)
    if images.dtype != torch.uint8:
        images = images.float()
    params = params.to(images.device, torch.float32).contiguous()
    if images.device.type == "cuda":
        from dinovmf.kernels.augment import augment_crops_triton  # needs triton (`fused_unavailable`)
        return augment_crops_triton(images.contiguous(), params, mean, std)
    if images.device.type != "cpu":
        raise ValueError(f"fused_augment runs on CPU or CUDA tensors, got {images.device}")
    return load_cpu_op()(images.contiguous(), params, list(map(float, mean)), list(map(float, std)), CPU_ISAS[isa])


class MultiCropAugmentation:
    """The augmentation of a multi-crop batch on `device`: uint8 crops + parameters -> float crops.

    `__call__(crops, params)`: `crops` the decoders' uint8 [B, s, s, 3] crops (global first; any
    device), `params` float32 [B, num_crops, NUM_PARAMS]. Crops of one size are augmented in one
    kernel call. Returns normalised float32 [B, 3, s, s] crops on `device`, in the same order.
    Where `fused_augment` cannot run (extension not built, no triton) it says so once and runs the
    torch reference instead.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        why = fused_unavailable(self.device)
        self.fused = why is None
        if not self.fused:
            print(f"[dinovmf.data] fused augmentation unavailable on {self.device} ({why}): using the torch "
                  "reference (slower)")

    def __call__(self, crops: list[torch.Tensor], params: torch.Tensor) -> list[torch.Tensor]:
        if not crops:
            raise ValueError("crops must hold at least one crop")
        b = crops[0].shape[0]
        if any(c.shape[0] != b for c in crops):
            raise ValueError(f"all crops must have the same batch size, got {[c.shape[0] for c in crops]}")
        if params.shape != (b, len(crops), P.NUM_PARAMS):
            raise ValueError(f"params must be [B={b}, crops={len(crops)}, {P.NUM_PARAMS}], got {tuple(params.shape)}")
        params = params.to(self.device, non_blocking=True)
        out: list[torch.Tensor | None] = [None] * len(crops)
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[1:]), []).append(i)
        for idx in groups.values():
            images = torch.cat([crops[i].to(self.device, non_blocking=True) for i in idx])
            rows = torch.cat([params[:, i] for i in idx])
            if self.fused:
                done = fused_augment(images, rows)
            else:
                done = augment_reference(to_float_nchw(images) if images.dtype == torch.uint8 else images.float(), rows)
            for i, part in zip(idx, done.split(b)):
                out[i] = part
        return out
