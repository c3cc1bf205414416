"""DINO's photometric augmentation as batched torch ops: the reference every fused path is tested against.

The decoders hand over uint8 crops (already random-resized-cropped) and one parameter row per crop
(`augment_params`: drawn from the crop's key). `augment_reference(x, params)` applies, vectorised
over the batch with per-row parameters: horizontal flip, colour jitter (brightness, contrast,
saturation, hue in the row's drawn order, as torchvision's ColorJitter), grayscale, Gaussian blur
(separable, reflect padding, radius ceil(3 sigma) per row), solarisation, then ImageNet
normalisation. An op drawn for a fraction of the rows runs only on those rows (gather, apply,
scatter), so rare ops cost little. It runs in the dtype of `x`: float64 makes it the oracle of the
fused float32 implementations (csrc/augment_cpu.cpp, kernels/augment.py, see `fused.fused_augment`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinovmf.kernels.augment_layout import LUMA_WEIGHTS

from . import augment_params as P

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Functional ops on float images [N, 3, H, W] in [0, 1]; factors are per-sample tensors [N].
# --------------------------------------------------------------------------------------------------
def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB images [N, 3, H, W]."""
    r, g, b = x.unbind(1)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, clamped (torchvision's adjust_brightness)."""
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (torchvision's adjust_contrast)."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's luma (torchvision's adjust_saturation)."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` (fraction of the circle, in [-0.5, 0.5]); saturation and value kept.

    Exact HSV arithmetic without materialising HSV: a hue rotation keeps max = v and
    delta = max - min, and HSV -> RGB is channel = max - delta * clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6, n = 5, 3, 1 for r, g, b. 6 h is read off the RGB sector directly.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(dim=1, keepdim=True)
    delta = maxc - x.amin(dim=1, keepdim=True)
    # 6 h (up to a multiple of 6) by the sector of the largest channel; gray pixels (delta = 0)
    # have a zero numerator, so any hue works for them.
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r) + 2 * delta, (r - g) + 4 * delta))
    h6 = num / delta.clamp_min(1e-12) + 6.0 * shift.view(-1, 1, 1, 1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6, 6.0)
    return maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def blur_radius(sigma: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-row kernel radius ceil(3 sigma) (sigma in float32, as the fused kernels compute it), at most
    side - 1 (reflect padding needs radius < side); 0 (no blur) for a one-pixel side."""
    r = torch.ceil(3.0 * sigma.float()).long()
    return r.clamp(min=0, max=min(height, width) - 1)


def gaussian_kernels(sigma: torch.Tensor, radius: torch.Tensor, width: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels [N, 2 * width + 1], row i truncated to |offset| <= radius[i]
    (zero taps beyond it, so a row blurs as with a kernel of its own radius)."""
    offsets = torch.arange(-width, width + 1, device=sigma.device, dtype=sigma.dtype).view(1, -1)
    k = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    k = torch.where(offsets.abs() <= radius.view(-1, 1).to(sigma.dtype), k, torch.zeros_like(k))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-row sigma and radius (`blur_radius`); reflect padding.

    One grouped convolution per axis: the batch's N * 3 channels are the groups, each with its own
    row's kernel (zero-padded to the batch's widest), so rows with different sigmas blur in one call.
    """
    n, c, h, w = x.shape
    radius = blur_radius(sigma, h, w)
    width = int(radius.max().item()) if n else 0
    if width == 0:
        return x
    k = gaussian_kernels(sigma.to(x.dtype), radius, width).repeat_interleave(c, dim=0)  # [N*C, K]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (width, width, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, width, width), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels at or above `threshold` (PIL's ImageOps.solarize(threshold=128))."""
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def to_float_nchw(images: torch.Tensor, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, H, W, 3] (decoder layout) -> float [N, 3, H, W] in [0, 1] on `device`."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    images = images.to(device, non_blocking=True) if device is not None else images
    return images.permute(0, 3, 1, 2).to(dtype).div_(255.0)


# --------------------------------------------------------------------------------------------------
# The composed pipeline, parameters given
# --------------------------------------------------------------------------------------------------
def _apply_rows(x: torch.Tensor, rows: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """x with fn applied, in place, to the rows where the bool mask `rows` is set (args indexed alike).

    For expensive ops drawn for a fraction of the rows (hue, blur): gather, apply, scatter. The
    `nonzero` costs one device sync per call, which is why cheap ops use `torch.where` instead.
    """
    idx = rows.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, *args)
    x[idx] = fn(x[idx], *(a[idx] for a in args))
    return x


def _jitter_step(x: torch.Tensor, op: torch.Tensor, p: dict) -> torch.Tensor:
    """One of the four colour-jitter steps: each row applies the op `op[row]` (an index into augment_params.JITTER_OPS).

    Brightness, contrast and saturation are all blends `f * x + (1 - f) * other` with other = 0, the
    mean luma, or the luma. So one fused blend `f * x + (1 - f) * (a * luma + c * mean_luma)` with
    per-row (f, a, c) applies whichever of the three a row drew (f = 1 for rows that drew hue or no
    jitter); hue then runs on its own rows. The blend touches the 3-channel image twice, not per op.
    """
    on = p["jitter"]
    b, c, s = (on & (op == P.JITTER_OPS.index(name)) for name in ("brightness", "contrast", "saturation"))
    one = torch.ones_like(p["brightness"])
    f = torch.where(b, p["brightness"], torch.where(c, p["contrast"], torch.where(s, p["saturation"], one)))
    gray = rgb_to_grayscale(x)                                   # [N, 1, H, W]
    mean = gray.mean(dim=(1, 2, 3))                              # [N]
    w_gray = (1 - f) * s.to(x.dtype)                             # saturation rows blend with the luma
    w_mean = (1 - f) * c.to(x.dtype) * mean                      # contrast rows with its mean
    other = torch.addcmul(_per_sample(w_mean), _per_sample(w_gray), gray)
    x = torch.addcmul(other, _per_sample(f), x).clamp_(0, 1)
    return _apply_rows(x, on & (op == P.JITTER_OPS.index("hue")), adjust_hue, p["hue"])


def params_by_name(params: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The columns of a parameter table [N, NUM_PARAMS] by name: flags as bool, `jitter_order` as
    int64 [N, 4], factors and sigma in `dtype`."""
    if params.dim() != 2 or params.shape[1] != P.NUM_PARAMS:
        raise ValueError(f"params must be [N, {P.NUM_PARAMS}] (augment_params.PARAM_NAMES), "
                         f"got {tuple(params.shape)}")
    col = {name: params[:, i] for i, name in enumerate(P.PARAM_NAMES)}
    out = {name: col[name] > 0.5 for name in ("flip", "jitter", "gray", "blur", "solarize")}
    out["jitter_order"] = params[:, P.OP0:P.OP3 + 1].round().long()
    for name in ("brightness", "contrast", "saturation", "hue", "sigma"):
        out[name] = col[name].to(dtype)
    return out


def augment_reference(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Augment float images [N, 3, H, W] in [0, 1] with per-row parameters `params` [N, NUM_PARAMS];
    returns normalised images in the dtype of `x`."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"x must be float [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    if params.shape[0] != x.shape[0]:
        raise ValueError(f"params has {params.shape[0]} rows for {x.shape[0]} images")
    p = params_by_name(params.to(x.device), x.dtype)
    x = torch.where(_per_sample(p["flip"]), x.flip(-1), x)
    for step in range(4):
        x = _jitter_step(x, p["jitter_order"][:, step], p)
    x = torch.where(_per_sample(p["gray"]), rgb_to_grayscale(x).expand(-1, 3, -1, -1), x)
    x = _apply_rows(x, p["blur"], gaussian_blur, p["sigma"])
    x = torch.where(_per_sample(p["solarize"]), solarize(x), x)
    return normalize(x)
