"""CLS-to-patch attention maps of a backbone's last block, as in DINO's visualisation (`dinovmf attention`).

For an image resized to N x N (the patch grid is N / patch_size per side), the last block's attention
weights are computed explicitly (`VisionTransformer.last_attention_weights`: softmax(q k^T / sqrt(d))
from the same q, k the SDPA kernel gets). The CLS query's row, per head, is a distribution over all
tokens: CLS itself, the register tokens (if any) and the patches; it sums to one. The map of a head is
that row restricted to the patches and renormalised over them (so it sums to one over the patches),
as DINO's figure shows and thresholds it; the share of the row the CLS token and the registers take
is reported beside it (registers often soak up much of it: that is what they are for). The mean map
is the mean of the head maps (it sums to one too).

`threshold_mask(map, mass)` keeps the fewest patches whose attention adds up to at least `mass` (the
largest first): DINO's paper figure with mass 0.6.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Output images are enlarged (nearest neighbour, whole pixels) to at least this side for viewing.
MIN_DISPLAY_SIDE = 224
OVERLAY_ALPHA = 0.6     # weight of the heat map over the image
COLORMAP = "inferno"
MAX_OVERVIEW_ROWS = 16  # images in the overview figure


@dataclass
class AttentionMaps:
    """The last block's CLS attention for a batch of images (H heads, rows x cols patches, R registers)."""
    heads: torch.Tensor           # [B, H, rows, cols]: CLS -> patch per head, each sums to 1 over patches
    cls_row: torch.Tensor         # [B, H, 1 + R + rows*cols]: the CLS query's softmax row (sums to 1)
    num_registers: int

    @property
    def mean(self) -> torch.Tensor:
        """[B, rows, cols]: the mean over heads of the head maps (sums to 1)."""
        return self.heads.mean(dim=1)

    @property
    def cls_mass(self) -> torch.Tensor:
        """[B, H]: share of the CLS row on the CLS token itself."""
        return self.cls_row[..., 0]

    @property
    def register_mass(self) -> torch.Tensor:
        """[B, H]: share of the CLS row on the register tokens (0 without registers)."""
        return self.cls_row[..., 1:1 + self.num_registers].sum(dim=-1)

    @property
    def patch_mass(self) -> torch.Tensor:
        """[B, H]: share of the CLS row on the patches (what the maps renormalise)."""
        return self.cls_row[..., 1 + self.num_registers:].sum(dim=-1)


@torch.no_grad()
def cls_attention_maps(backbone: nn.Module, images: torch.Tensor) -> AttentionMaps:
    """CLS-to-patch attention maps of `backbone`'s last block for normalised images [B, 3, N, N]."""
    rows, cols = backbone.grid_shape(images.shape[-2], images.shape[-1])
    weights = backbone.last_attention_weights(images).float()  # [B, H, L, L]
    cls_row = weights[:, :, 0, :]
    patches = cls_row[..., backbone.num_prefix_tokens:]
    heads = patches / patches.sum(dim=-1, keepdim=True)
    return AttentionMaps(heads.reshape(*heads.shape[:2], rows, cols), cls_row, backbone.num_register_tokens)


def threshold_mask(maps: torch.Tensor, mass: float) -> torch.Tensor:
    """Bool mask of the same shape as `maps` [..., rows, cols] (each map sums to 1): per map, the
    fewest patches, largest first, whose attention adds up to at least `mass` (0 < mass <= 1)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {mass}")
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).double()
    values, order = flat.sort(dim=-1, descending=True)
    total = values.sum(dim=-1, keepdim=True)
    before = values.cumsum(dim=-1) - values  # mass of the larger patches kept ahead of each one
    # Keep a patch while the mass ahead of it is short of the target (relative to the map's own sum,
    # which is 1 up to rounding); the first patch is always kept.
    keep_sorted = before < mass * total
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


# ------------------------------------------------------------------------------------------ inputs

def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the image's central square, resized (bicubic). ValueError naming the
    file when it is missing or not a readable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {str(path)!r} does not exist" if not path.exists()
                         else f"image {str(path)!r} is not a file")
    try:
        with Image.open(path) as im:
            im = ImageOps.fit(im.convert("RGB"), (size, size), Image.BICUBIC)
            return np.asarray(im).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"image {str(path)!r} cannot be read as an image: {e}") from None


def expand_image_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """The images named, with a folder standing for the images directly inside it (sorted)."""
    from dinovmf.data.prepare import IMAGE_EXTENSIONS

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"folder {str(p)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
            out += found
        else:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------ outputs

def _display_scale(side: int) -> int:
    return max(1, math.ceil(MIN_DISPLAY_SIDE / side))


def _upsample(grid: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of [rows, cols(, C)] by an integer factor (patches stay squares)."""
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3]: `heat` [rows, cols] (scaled to its max) coloured and blended over `image`,
    each patch a square of the image, the whole enlarged for display."""
    import matplotlib

    scale = _display_scale(image.shape[0])
    factor = image.shape[0] // heat.shape[0]
    colours = matplotlib.colormaps[COLORMAP](heat / max(float(heat.max()), 1e-12))[..., :3]
    colours = _upsample(_upsample(colours, factor), scale)
    base = _upsample(image.astype(np.float64) / 255.0, scale)
    return np.round(255 * ((1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colours)).astype(np.uint8)


def mask_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 [S, S]: the binary mask (255 kept, 0 dropped) at the image's (display) resolution."""
    scale = _display_scale(image.shape[0])
    factor = image.shape[0] // mask.shape[0]
    return _upsample(_upsample(mask.astype(np.uint8) * 255, factor), scale)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    Image.fromarray(array).save(path)


def _unique_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return stems


def write_overview(path: Path, images: list[np.ndarray], maps: AttentionMaps,
                   masks: torch.Tensor | None, names: list[str], title: str) -> None:
    """One figure: per image (a row) the image, each head's map, the mean and, with a threshold,
    the mean's mask over the image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), MAX_OVERVIEW_ROWS)
    n_heads = maps.heads.shape[1]
    cols = 2 + n_heads + (masks is not None)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n + 0.4), squeeze=False, dpi=100)
    for i in range(n):
        panels = [(_upsample(images[i], _display_scale(images[i].shape[0])), names[i])]
        panels += [(heat_overlay(images[i], maps.heads[i, h].numpy()), f"head {h}") for h in range(n_heads)]
        panels.append((heat_overlay(images[i], maps.mean[i].numpy()), "mean"))
        if masks is not None:
            keep = mask_image(images[i], masks[i, -1].numpy())[..., None] > 0
            panels.append((np.where(keep, _upsample(images[i], _display_scale(images[i].shape[0])), 0)
                           .astype(np.uint8), "mean, top mass"))
        for ax, (img, label) in zip(axes[i], panels):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(label, fontsize=7)
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    from PIL import Image
    # 256 colours: the heat maps are flat per patch, so the palette costs nothing visible and the file
    # shrinks ~3x (small enough for a README).
    Image.fromarray(rgb).quantize(256).save(path, optimize=True)


def write_attention_maps(backbone: nn.Module, image_paths: list[Path], out_dir: str | os.PathLike,
                         image_size: int, threshold: float | None = None,
                         device: torch.device | str = "cpu") -> list[dict]:
    """Write, per image, `<stem>_head<h>.png` (each head's map over the image), `<stem>_mean.png`,
    with a threshold `<stem>_mask_head<h>.png` / `<stem>_mask_mean.png` (binary), and one
    `attention_overview.png`. Returns one summary dict per image (files, masses per head)."""
    from dinovmf.data.augment import normalize, to_float_nchw

    if image_size < 1 or image_size % backbone.patch_size:
        raise ValueError(f"image size must be a positive multiple of the patch size {backbone.patch_size}, "
                         f"got {image_size}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not image_paths:
        raise ValueError("no images given")
    images = [load_image(p, image_size) for p in image_paths]  # all read before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    batch = normalize(to_float_nchw(torch.from_numpy(np.stack(images)), device))
    maps = cls_attention_maps(backbone, batch)
    maps = AttentionMaps(maps.heads.cpu(), maps.cls_row.cpu(), maps.num_registers)
    all_maps = torch.cat([maps.heads, maps.mean[:, None]], dim=1)  # [B, H + 1, rows, cols]: heads, mean
    masks = threshold_mask(all_maps, threshold) if threshold is not None else None
    labels = [f"head{h}" for h in range(maps.heads.shape[1])] + ["mean"]
    summaries = []
    for i, stem in enumerate(_unique_stems(image_paths)):
        files = []
        for j, label in enumerate(labels):
            path = out_dir / f"{stem}_{label}.png"
            _save_png(heat_overlay(images[i], all_maps[i, j].numpy()), path)
            files.append(path)
            if masks is not None:
                path = out_dir / f"{stem}_mask_{label}.png"
                _save_png(mask_image(images[i], masks[i, j].numpy()), path)
                files.append(path)
        summaries.append({"image": str(image_paths[i]), "files": [str(f) for f in files],
                          "patch_mass": maps.patch_mass[i].tolist(), "cls_mass": maps.cls_mass[i].tolist(),
                          "register_mass": maps.register_mass[i].tolist()})
    rows, cols = maps.heads.shape[-2:]
    title = (f"last-block CLS attention, {maps.heads.shape[1]} heads, {rows}x{cols} patches of "
             f"{backbone.patch_size} px" + (f", mask: top {threshold:.0%} of the mass" if masks is not None else ""))
    write_overview(out_dir / "attention_overview.png", images, maps, masks, [p.name for p in image_paths], title)
    return summaries
