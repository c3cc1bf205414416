"""DINO's multi-crop photometric augmentation, batched in torch on the batch's device (no torchvision).

The loaders hand over uint8 crops (already random-resized-cropped at decode); everything else runs
here, vectorised over the batch with per-sample random parameters: horizontal flip, colour jitter
(p=0.8: brightness .4, contrast .4, saturation .2, hue .1, in a random order per sample as in
torchvision's ColorJitter), grayscale (p=0.2), Gaussian blur (sigma in [0.1, 2]; p = 1.0 / 0.1 / 0.5
for global 1 / global 2 / local crops), solarisation (p=0.2, second global crop only), then ImageNet
normalisation. An op with probability p < 1 runs only on the rows drawn for it (gather, apply,
scatter), so rare ops cost little. All draws come from one `torch.Generator`, so a batch's
augmentation is a pure function of (generator seed, input).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma, the weights of PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class ViewRecipe:
    """Probabilities and strengths of the photometric augmentation for one kind of view."""
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def dino_view_recipes(blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5), solarize_p: float = 0.2,
                      **common) -> tuple[tuple[ViewRecipe, ViewRecipe], ViewRecipe]:
    """DINO's (global 1, global 2) and local recipes: blur with probabilities `blur_p` (one per kind of
    view), solarisation on the second global crop only; `common` (ViewRecipe fields) shared by all.
    `dino_view_recipes(**dataclasses.asdict(cfg.augment))` builds them from a training config."""
    blur_sigma = tuple(common.pop("blur_sigma", ViewRecipe.blur_sigma))
    global1 = ViewRecipe(blur_p=blur_p[0], blur_sigma=blur_sigma, **common)
    global2 = ViewRecipe(blur_p=blur_p[1], blur_sigma=blur_sigma, solarize_p=solarize_p, **common)
    local = ViewRecipe(blur_p=blur_p[2], blur_sigma=blur_sigma, **common)
    return (global1, global2), local


(GLOBAL1, GLOBAL2), LOCAL = dino_view_recipes()


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


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels [N, 2 * radius + 1], one per sigma."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma; reflect padding; kernel radius ceil(3 sigma_max).

    One grouped convolution per axis: the batch's N * 3 channels are the groups, each with its own
    sample's kernel, so images with different sigmas blur in the same call.
    """
    n, c, h, w = x.shape
    radius = int(torch.ceil(3.0 * sigma.max()).item())
    radius = max(1, min(radius, h - 1, w - 1))  # reflect padding needs radius < side
    k = gaussian_kernels(sigma.to(x.dtype), radius).repeat_interleave(c, dim=0)  # [N*C, K]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels at or above `threshold` (PIL's ImageOps.solarize(threshold=128))."""
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def to_float_nchw(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] (decoder layout) -> float32 [N, 3, H, W] in [0, 1] on `device`."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    images = images.to(device, non_blocking=True) if device is not None else images
    return images.permute(0, 3, 1, 2).float().div_(255.0)


# --------------------------------------------------------------------------------------------------
# The randomised pipeline
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
    """One of the four colour-jitter steps: each row applies the op `op[row]` (an index into JITTER_OPS).

    Brightness, contrast and saturation are all blends `f * x + (1 - f) * other` with other = 0, the
    mean luma, or the luma. So one fused blend `f * x + (1 - f) * (a * luma + c * mean_luma)` with
    per-row (f, a, c) applies whichever of the three a row drew (f = 1 for rows that drew hue or no
    jitter); hue then runs on its own rows. The blend touches the 3-channel image twice, not per op.
    """
    on = p["jitter"]
    b, c, s = (on & (op == JITTER_OPS.index(name)) for name in ("brightness", "contrast", "saturation"))
    one = torch.ones_like(p["brightness"])
    f = torch.where(b, p["brightness"], torch.where(c, p["contrast"], torch.where(s, p["saturation"], one)))
    gray = rgb_to_grayscale(x)                                   # [N, 1, H, W]
    mean = gray.mean(dim=(1, 2, 3))                              # [N]
    w_gray = (1 - f) * s.to(x.dtype)                             # saturation rows blend with the luma
    w_mean = (1 - f) * c.to(x.dtype) * mean                      # contrast rows with its mean
    other = torch.addcmul(_per_sample(w_mean), _per_sample(w_gray), gray)
    x = torch.addcmul(other, _per_sample(f), x).clamp_(0, 1)
    return _apply_rows(x, on & (op == JITTER_OPS.index("hue")), adjust_hue, p["hue"])


def _recipe_attr(r: ViewRecipe, attr: str) -> float:
    """A recipe field, with the blur sigma range split into blur_sigma_lo / blur_sigma_hi."""
    if attr == "blur_sigma_lo":
        return r.blur_sigma[0]
    if attr == "blur_sigma_hi":
        return r.blur_sigma[1]
    return getattr(r, attr)


def sample_params(n: int, recipes: list[ViewRecipe], g: torch.Generator, device) -> dict:
    """Per-sample random parameters for n rows; row i follows recipes[i * len(recipes) // n].

    Every draw is made for every row, in a fixed order, so the parameters of a row do not depend
    on which ops other rows drew.
    """
    per_view = n // len(recipes)
    def col(attr):
        return torch.tensor([_recipe_attr(r, attr) for r in recipes], device=device,
                            dtype=torch.float32).repeat_interleave(per_view)
    u = lambda: torch.rand(n, generator=g, device=device)  # noqa: E731
    bright, contr, sat, hue = col("brightness"), col("contrast"), col("saturation"), col("hue")
    sig_lo = col("blur_sigma_lo")
    sig_hi = col("blur_sigma_hi")
    return {
        "flip": u() < col("flip_p"),
        "jitter": u() < col("jitter_p"),
        # A random order of the four jitter ops per sample (argsort of uniforms is a uniform permutation).
        "jitter_order": torch.rand(n, 4, generator=g, device=device).argsort(dim=1),
        "brightness": 1 + bright * (2 * u() - 1),
        "contrast": 1 + contr * (2 * u() - 1),
        "saturation": 1 + sat * (2 * u() - 1),
        "hue": hue * (2 * u() - 1),
        "gray": u() < col("gray_p"),
        "blur": u() < col("blur_p"),
        "sigma": sig_lo + (sig_hi - sig_lo) * u(),
        "solarize": u() < col("solarize_p"),
    }


def augment(x: torch.Tensor, recipes: list[ViewRecipe], g: torch.Generator,
            return_params: bool = False):
    """Augment float images [N, 3, H, W] in [0, 1] whose N rows are len(recipes) equal view blocks.

    Returns normalised float images (and the drawn parameters when `return_params`).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be [N, 3, H, W], got {tuple(x.shape)}")
    n = x.shape[0]
    if n % len(recipes):
        raise ValueError(f"x has {n} rows, not a multiple of len(recipes)={len(recipes)}")
    p = sample_params(n, recipes, g, x.device)

    x = torch.where(_per_sample(p["flip"]), x.flip(-1), x)
    for step in range(4):
        x = _jitter_step(x, p["jitter_order"][:, step], p)
    x = torch.where(_per_sample(p["gray"]), rgb_to_grayscale(x).expand(-1, 3, -1, -1), x)
    x = _apply_rows(x, p["blur"], gaussian_blur, p["sigma"])
    x = torch.where(_per_sample(p["solarize"]), solarize(x), x)
    out = normalize(x)
    return (out, p) if return_params else out


class MultiCropAugmentation:
    """DINO's augmentation of a multi-crop batch: global 1, global 2, then the local crops.

    `__call__(crops, generator)` takes the decoders' uint8 [B, H, W, 3] crops (or float
    [B, 3, H, W] in [0, 1]), moves them to `device`, and returns normalised float32 [B, 3, H, W]
    crops in the same order. The local crops share one size and one recipe, so they are augmented
    as one [num_local * B] batch; the two global crops as one [2B] batch with per-row recipes.
    """

    def __init__(self, device: torch.device | str = "cpu", global_recipes=(GLOBAL1, GLOBAL2),
                 local_recipe: ViewRecipe = LOCAL):
        self.device = torch.device(device)
        self.global_recipes = list(global_recipes)
        self.local_recipe = local_recipe

    def _prepare(self, crop: torch.Tensor) -> torch.Tensor:
        if crop.dtype == torch.uint8:
            return to_float_nchw(crop, self.device)
        if crop.dim() != 4 or crop.shape[1] != 3:
            raise ValueError(f"float crops must be [B, 3, H, W], got {tuple(crop.shape)}")
        return crop.to(self.device, torch.float32)

    def __call__(self, crops: list[torch.Tensor], generator: torch.Generator,
                 return_params: bool = False):
        ng = len(self.global_recipes)
        if len(crops) < ng:
            raise ValueError(f"crops must hold at least {ng} global crops, got {len(crops)}")
        b = crops[0].shape[0]
        if any(c.shape[0] != b for c in crops):
            raise ValueError(f"all crops must have the same batch size, got {[c.shape[0] for c in crops]}")
        glob, p_glob = augment(torch.cat([self._prepare(c) for c in crops[:ng]]),
                               self.global_recipes, generator, return_params=True)
        out = list(glob.split(b))
        params = {"global": p_glob}
        if len(crops) > ng:
            loc, p_loc = augment(torch.cat([self._prepare(c) for c in crops[ng:]]),
                                 [self.local_recipe] * (len(crops) - ng), generator, return_params=True)
            out += list(loc.split(b))
            params["local"] = p_loc
        return (out, params) if return_params else out


def augmentation_generator(device: torch.device | str, seed: int, epoch: int, rank: int,
                           step: int) -> torch.Generator:
    """A generator on `device` seeded from (seed, epoch, rank, step): reproducible, distinct per batch."""
    from .crops import hash32
    key = hash32(hash32(hash32(hash32(seed) ^ epoch) ^ rank) ^ step)
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(key)
    return g
