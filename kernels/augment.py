"""Triton kernels of the fused photometric augmentation (the GPU path of `dinovmf.data.fused.fused_augment`).

Same computation as the C++ kernel (csrc/augment_cpu.cpp) and the torch reference
(`dinovmf.data.augment.augment_reference`), one parameter row per crop (`augment_params` layout):

1. `_stage_kernel` (crops that draw jitter): read the crop once (uint8 [H, W, 3] or float [3, H, W],
   flipped when drawn), apply the jitter steps before contrast, write the staged float image and
   one partial luma sum per block; the host sums the partials in a fixed order (deterministic), which
   gives contrast's mean luma.
2. `_photometric_kernel`: read the staged image (or the source), apply the remaining jitter steps and
   grayscale; then solarisation + normalisation into the output, or, for crops that draw blur, the
   pre-blur image back into the stage buffer.
3. `_blur_kernel` twice (horizontal, then vertical with solarisation + normalisation): the separable
   Gaussian of radius ceil(3 sigma) (at most side - 1) with reflect padding, weights computed in the
   kernel; crops that draw no blur are masked off.
Every program covers BLOCK pixels of one crop; the crop's parameters are scalar loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinovmf.kernels import augment_layout as P
from dinovmf.kernels.augment_layout import LUMA_WEIGHTS

BLOCK = 1024
LUMA_R, LUMA_G, LUMA_B = (tl.constexpr(w) for w in LUMA_WEIGHTS)  # globals a kernel reads must be constexpr


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _jitter_op(r, g, b, op, factor, hue6, mean):
    """One jitter op on a block of pixels: 0 brightness, 1 contrast, 2 saturation, 3 hue (`op` a scalar)."""
    if op == 0:
        r = tl.minimum(r * factor, 1.0)
        g = tl.minimum(g * factor, 1.0)
        b = tl.minimum(b * factor, 1.0)
    elif op == 3:
        maxc = tl.maximum(r, tl.maximum(g, b))
        delta = maxc - tl.minimum(r, tl.minimum(g, b))
        num = tl.where(maxc == r, g - b, tl.where(maxc == g, (b - r) + 2.0 * delta, (r - g) + 4.0 * delta))
        h6 = num / tl.maximum(delta, 1e-12) + hue6
        h6 = h6 - 6.0 * tl.floor(h6 * (1.0 / 6.0))
        k = 5.0 + h6
        k = tl.where(k >= 6.0, k - 6.0, k)
        r = maxc - delta * _clamp01(tl.minimum(k, 4.0 - k))
        k = 3.0 + h6
        k = tl.where(k >= 6.0, k - 6.0, k)
        g = maxc - delta * _clamp01(tl.minimum(k, 4.0 - k))
        k = 1.0 + h6
        k = tl.where(k >= 6.0, k - 6.0, k)
        b = maxc - delta * _clamp01(tl.minimum(k, 4.0 - k))
    else:
        # Contrast blends with the mean luma, saturation with the pixel's luma.
        other = tl.where(op == 1, mean, LUMA_R * r + LUMA_G * g + LUMA_B * b) * (1.0 - factor)
        r = _clamp01(factor * r + other)
        g = _clamp01(factor * g + other)
        b = _clamp01(factor * b + other)
    return r, g, b


@triton.jit
def _jitter_steps(r, g, b, prm, first, last, mean, OP0: tl.constexpr, BRIGHTNESS: tl.constexpr,
                  HUE: tl.constexpr):
    """Jitter steps first .. last - 1 (scalars) of the crop whose parameter row starts at `prm`."""
    for s in tl.static_range(4):
        if s >= first:
            if s < last:
                op = tl.load(prm + OP0 + s).to(tl.int32)
                factor = tl.load(prm + BRIGHTNESS + tl.minimum(op, 2))
                hue6 = 6.0 * tl.load(prm + HUE)
                r, g, b = _jitter_op(r, g, b, op, factor, hue6, mean)
    return r, g, b


@triton.jit
def _load_source(src, n, y, x, mask, flip, H, W, SRC_U8: tl.constexpr):
    """Pixels (y, x) of crop n as floats in [0, 1] (x mirrored when `flip`)."""
    xs = tl.where(flip, W - 1 - x, x)
    if SRC_U8:
        base = src + n.to(tl.int64) * H * W * 3 + (y * W + xs) * 3
        r = tl.load(base, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0)
        g = tl.load(base + 1, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0)
        b = tl.load(base + 2, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0)
    else:
        base = src + n.to(tl.int64) * 3 * H * W + y * W + xs
        r = tl.load(base, mask=mask, other=0.0)
        g = tl.load(base + H * W, mask=mask, other=0.0)
        b = tl.load(base + 2 * H * W, mask=mask, other=0.0)
    return r, g, b


@triton.jit
def _contrast_step(prm, OP0: tl.constexpr):
    """Index (0..3) of contrast in the crop's jitter order."""
    first = 0
    for s in tl.static_range(4):
        first += s * (tl.load(prm + OP0 + s).to(tl.int32) == 1).to(tl.int32)
    return first


@triton.jit
def _finish(r, g, b, out, n, offs, mask, solar, HW, mean_r, mean_g, mean_b, istd_r, istd_g, istd_b):
    """Solarisation (where drawn) and normalisation, stored to the output planes of crop n."""
    r = tl.where(solar, tl.where(r >= 0.5, 1.0 - r, r), r)
    g = tl.where(solar, tl.where(g >= 0.5, 1.0 - g, g), g)
    b = tl.where(solar, tl.where(b >= 0.5, 1.0 - b, b), b)
    base = out + n.to(tl.int64) * 3 * HW + offs
    tl.store(base, (r - mean_r) * istd_r, mask=mask)
    tl.store(base + HW, (g - mean_g) * istd_g, mask=mask)
    tl.store(base + 2 * HW, (b - mean_b) * istd_b, mask=mask)


@triton.jit
def _stage_kernel(SRC, PRM, STAGE, PARTIAL, H, W, NBLOCKS, SRC_U8: tl.constexpr, NUM_PARAMS: tl.constexpr,
                  FLIP: tl.constexpr, JITTER: tl.constexpr, OP0: tl.constexpr, BRIGHTNESS: tl.constexpr,
                  HUE: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    blk = tl.program_id(1)
    prm = PRM + n * NUM_PARAMS
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    mask = offs < tl.where(tl.load(prm + JITTER) > 0.5, HW, 0)  # masks off crops without jitter
    r, g, b = _load_source(SRC, n, offs // W, offs % W, mask, tl.load(prm + FLIP) > 0.5, H, W, SRC_U8)
    r, g, b = _jitter_steps(r, g, b, prm, 0, _contrast_step(prm, OP0), 0.0, OP0, BRIGHTNESS, HUE)
    base = STAGE + n.to(tl.int64) * 3 * HW + offs
    tl.store(base, r, mask=mask)
    tl.store(base + HW, g, mask=mask)
    tl.store(base + 2 * HW, b, mask=mask)
    luma = tl.where(mask, LUMA_R * r + LUMA_G * g + LUMA_B * b, 0.0)
    tl.store(PARTIAL + n * NBLOCKS + blk, tl.sum(luma, axis=0))


@triton.jit
def _photometric_kernel(SRC, PRM, STAGE, LUMA_SUM, OUT, H, W, mean_r, mean_g, mean_b, istd_r, istd_g, istd_b,
                        SRC_U8: tl.constexpr, NUM_PARAMS: tl.constexpr, FLIP: tl.constexpr, JITTER: tl.constexpr,
                        OP0: tl.constexpr, BRIGHTNESS: tl.constexpr, HUE: tl.constexpr, GRAY: tl.constexpr,
                        BLUR: tl.constexpr, SIGMA: tl.constexpr, SOLARIZE: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    prm = PRM + n * NUM_PARAMS
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    mask = offs < HW
    jitter = tl.load(prm + JITTER) > 0.5
    stage = STAGE + n.to(tl.int64) * 3 * HW + offs
    # Crops that drew jitter continue from the staged image, the others start from the source.
    # (Masks are built from scalar limits: a scalar bool & a block of bools fails in the interpreter.)
    staged = offs < tl.where(jitter, HW, 0)
    r = tl.load(stage, mask=staged, other=0.0)
    g = tl.load(stage + HW, mask=staged, other=0.0)
    b = tl.load(stage + 2 * HW, mask=staged, other=0.0)
    sr, sg, sb = _load_source(SRC, n, offs // W, offs % W, offs < tl.where(jitter, 0, HW), tl.load(prm + FLIP) > 0.5,
                              H, W, SRC_U8)
    r = tl.where(jitter, r, sr)
    g = tl.where(jitter, g, sg)
    b = tl.where(jitter, b, sb)
    first = tl.where(jitter, _contrast_step(prm, OP0), 0)
    last = tl.where(jitter, 4, 0)
    mean = tl.load(LUMA_SUM + n) / HW
    r, g, b = _jitter_steps(r, g, b, prm, first, last, mean, OP0, BRIGHTNESS, HUE)
    gray = tl.load(prm + GRAY) > 0.5
    luma = LUMA_R * r + LUMA_G * g + LUMA_B * b
    r = tl.where(gray, luma, r)
    g = tl.where(gray, luma, g)
    b = tl.where(gray, luma, b)
    # Crops that draw blur go back to the stage buffer for the blur passes; the others are finished.
    blur = _blur_radius(prm, H, W, BLUR, SIGMA) > 0
    to_stage = offs < tl.where(blur, HW, 0)
    tl.store(stage, r, mask=to_stage)
    tl.store(stage + HW, g, mask=to_stage)
    tl.store(stage + 2 * HW, b, mask=to_stage)
    _finish(r, g, b, OUT, n, offs, offs < tl.where(blur, 0, HW), tl.load(prm + SOLARIZE) > 0.5, HW, mean_r,
            mean_g, mean_b, istd_r, istd_g, istd_b)


@triton.jit
def _blur_radius(prm, H, W, BLUR: tl.constexpr, SIGMA: tl.constexpr):
    """ceil(3 sigma) in float32, at most min(H, W) - 1; 0 for a crop that draws no blur."""
    sigma = tl.load(prm + SIGMA)
    radius = tl.minimum(tl.ceil(3.0 * sigma).to(tl.int32), tl.minimum(H, W) - 1)
    return tl.where(tl.load(prm + BLUR) > 0.5, radius, 0)


@triton.jit
def _blur_kernel(SRC, PRM, DST, H, W, mean_r, mean_g, mean_b, istd_r, istd_g, istd_b, VERTICAL: tl.constexpr,
                 NUM_PARAMS: tl.constexpr, BLUR: tl.constexpr, SIGMA: tl.constexpr, SOLARIZE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One axis of the separable blur of crop n (reflect padding); the vertical pass also finishes."""
    n = tl.program_id(0)
    prm = PRM + n * NUM_PARAMS
    radius = _blur_radius(prm, H, W, BLUR, SIGMA)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    mask = offs < tl.where(radius > 0, HW, 0)
    y = offs // W
    x = offs % W
    sigma = tl.load(prm + SIGMA)
    total = 0.0
    for k in range(-radius, radius + 1):
        total += tl.exp(-0.5 * (k / sigma) * (k / sigma))
    base = SRC + n.to(tl.int64) * 3 * HW
    acc_r = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(-radius, radius + 1):
        w = tl.exp(-0.5 * (k / sigma) * (k / sigma)) / total
        if VERTICAL:
            yy = y + k
            yy = tl.where(yy < 0, -yy, tl.where(yy >= H, 2 * (H - 1) - yy, yy))
            src = base + yy * W + x
        else:
            xx = x + k
            xx = tl.where(xx < 0, -xx, tl.where(xx >= W, 2 * (W - 1) - xx, xx))
            src = base + y * W + xx
        acc_r += w * tl.load(src, mask=mask, other=0.0)
        acc_g += w * tl.load(src + HW, mask=mask, other=0.0)
        acc_b += w * tl.load(src + 2 * HW, mask=mask, other=0.0)
    if VERTICAL:
        _finish(acc_r, acc_g, acc_b, DST, n, offs, mask, tl.load(prm + SOLARIZE) > 0.5, HW, mean_r, mean_g,
                mean_b, istd_r, istd_g, istd_b)
    else:
        out = DST + n.to(tl.int64) * 3 * HW + offs
        tl.store(out, acc_r, mask=mask)
        tl.store(out + HW, acc_g, mask=mask)
        tl.store(out + 2 * HW, acc_b, mask=mask)


# The parameter columns and block size each kernel is launched with (constexprs), by kernel.
CONSTEXPRS = {
    "stage": dict(NUM_PARAMS=P.NUM_PARAMS, FLIP=P.FLIP, JITTER=P.JITTER, OP0=P.OP0, BRIGHTNESS=P.BRIGHTNESS,
                  HUE=P.HUE, BLOCK=BLOCK),
    "photometric": dict(NUM_PARAMS=P.NUM_PARAMS, FLIP=P.FLIP, JITTER=P.JITTER, OP0=P.OP0, BRIGHTNESS=P.BRIGHTNESS,
                        HUE=P.HUE, GRAY=P.GRAY, BLUR=P.BLUR, SIGMA=P.SIGMA, SOLARIZE=P.SOLARIZE, BLOCK=BLOCK),
    "blur": dict(NUM_PARAMS=P.NUM_PARAMS, BLUR=P.BLUR, SIGMA=P.SIGMA, SOLARIZE=P.SOLARIZE, BLOCK=BLOCK),
}


def augment_crops_triton(images: torch.Tensor, params: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised float32 [N, 3, H, W] from contiguous uint8 [N, H, W, 3] or float32 [N, 3, H, W] crops
    and float32 parameter rows [N, NUM_PARAMS] on the same device (checked by `fused_augment`)."""
    u8 = images.dtype == torch.uint8
    N = images.shape[0]
    H, W = (images.shape[1], images.shape[2]) if u8 else (images.shape[2], images.shape[3])
    out = torch.empty((N, 3, H, W), device=images.device, dtype=torch.float32)
    if N == 0:
        return out
    nblocks = triton.cdiv(H * W, BLOCK)
    stage = torch.empty_like(out)
    blurred = torch.empty_like(out)
    partial = torch.empty((N, nblocks), device=images.device, dtype=torch.float32)
    norm = [float(m) for m in mean] + [1.0 / float(s) for s in std]
    grid = (N, nblocks)
    _stage_kernel[grid](images, params, stage, partial, H, W, nblocks, SRC_U8=u8, **CONSTEXPRS["stage"])
    luma_sum = partial.sum(dim=1)  # a fixed-order reduction: the same mean on every run
    _photometric_kernel[grid](images, params, stage, luma_sum, out, H, W, *norm, SRC_U8=u8,
                              **CONSTEXPRS["photometric"])
    _blur_kernel[grid](stage, params, blurred, H, W, *norm, VERTICAL=False, **CONSTEXPRS["blur"])
    _blur_kernel[grid](blurred, params, out, H, W, *norm, VERTICAL=True, **CONSTEXPRS["blur"])
    return out
