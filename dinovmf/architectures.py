"""Named ViT backbones as plain data: the sizes (`vit_tiny` .. `vit_large`) and the presets of the released
DINOv2 / DINOv3 backbones, each a size plus the options that shape it (patch, layer scale, FFN, position
encoding, registers, qkv bias, LayerNorm epsilon).

The config (`model.arch`, `model.*` options: validation and defaults) and the models (`build_backbone`) both
read this table, so it imports nothing but the standard library. A `model.*` option left at None takes the
architecture's value; one that is set overrides it (`model.arch=dinov2_vits14 model.num_register_tokens=0`).

Sources of the preset values (the hub entry points that build the released models):
- DINOv2, facebookresearch/dinov2 `hubconf` / `dinov2/hub/backbones.py`: patch 14, `img_size=518` (a learned
  37 x 37 position grid), `init_values=1e-5` (layer scale), MLP FFN (SwiGLU only for ViT-g), qkv bias,
  LayerNorm eps 1e-6, `num_register_tokens=4` for the `_reg` models; ViT-g/14 (`vit_giant2`: 1536 wide, 40
  blocks, 24 heads) with the fused SwiGLU FFN. Other crop sizes resample the position grid bicubically with
  antialiasing, as DINOv2's `_reg` hub models (`interpolate_antialias=True`, `interpolate_offset=0`) and timm's
  ports do. DINOv2's hub models without registers resample with a `scale_factor` of (n + 0.1) / 37 and no
  antialiasing instead (DINO's historical kludge): `model.pos_embed_resample=offset` reproduces them.
- DINOv3, facebookresearch/dinov3 `dinov3/hub/backbones.py` (`dinov3_vits16` .. `dinov3_vitl16`): patch 16,
  RoPE (base 100, coordinates normalised per axis, rescaled by a log-uniform factor in [1/2, 2] while
  training), `layerscale_init=1e-5`, MLP FFN, qkv bias with the key bias masked (`mask_k_bias=True`),
  4 storage tokens, `norm_layer="layernormbf16"`, i.e. LayerNorm eps 1e-5.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FFN_KINDS = ("mlp", "swiglu")
POS_ENCODINGS = ("learned", "rope")
# How learned position embeddings are resampled to another patch grid (`VisionTransformer`): bicubic to the
# exact size; the same with antialiasing (timm, DINOv2's `_reg` hub models); or DINO's kludge, a scale factor
# of (n + 0.1) / grid without antialiasing (the original DINO's ViT, DINOv2's hub models without registers).
POS_RESAMPLINGS = ("exact", "antialias", "offset")
LAYER_NORM_EPS = 1e-6  # DINO, timm and DINOv2 use 1e-6, not PyTorch's 1e-5


@dataclass(frozen=True)
class ViTArch:
    """Width / depth / heads of a named ViT size."""
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


ARCHITECTURES = {
    "vit_tiny": ViTArch(192, 12, 3),
    "vit_small": ViTArch(384, 12, 6),
    "vit_base": ViTArch(768, 12, 12),
    "vit_large": ViTArch(1024, 24, 16),
    "vit_giant2": ViTArch(1536, 40, 24),  # DINOv2's name; its presets add the SwiGLU FFN it was trained with
}


@dataclass(frozen=True)
class BackboneOptions:
    """What shapes a backbone beyond its size; the defaults are the classic ViT of DINO and timm."""
    patch_size: int = 16
    img_size: int | None = None            # learned position grid = img_size / patch_size; None: the run's crops
    num_register_tokens: int = 0           # DINOv2's registers = DINOv3's storage tokens
    layerscale_init: float | None = None   # LayerScale (DINOv2 / CaiT) initial value; None: no layer scale
    ffn: str = "mlp"                       # mlp | swiglu (DINOv2's fused SwiGLU sizing)
    pos_encoding: str = "learned"          # learned (added, interpolated per crop) | rope (DINOv3's 2-D RoPE)
    qkv_bias: bool = True                  # with rope the key bias is masked (always zero), as DINOv3 and timm
    layer_norm_eps: float = LAYER_NORM_EPS
    pos_embed_resample: str = "exact"      # exact | antialias (DINOv2, timm) | offset (DINO): POS_RESAMPLINGS


@dataclass(frozen=True)
class BackbonePreset:
    size: str                  # a key of ARCHITECTURES
    options: BackboneOptions


_DINOV2 = BackboneOptions(patch_size=14, img_size=518, layerscale_init=1e-5, pos_embed_resample="antialias")
_DINOV2_REG4 = dataclasses.replace(_DINOV2, num_register_tokens=4)
_DINOV2_GIANT = dataclasses.replace(_DINOV2, ffn="swiglu")
_DINOV3 = BackboneOptions(patch_size=16, num_register_tokens=4, layerscale_init=1e-5, pos_encoding="rope",
                          layer_norm_eps=1e-5)

BACKBONE_PRESETS = {
    "dinov2_vits14": BackbonePreset("vit_small", _DINOV2),
    "dinov2_vitb14": BackbonePreset("vit_base", _DINOV2),
    "dinov2_vitl14": BackbonePreset("vit_large", _DINOV2),
    "dinov2_vits14_reg4": BackbonePreset("vit_small", _DINOV2_REG4),
    "dinov2_vitb14_reg4": BackbonePreset("vit_base", _DINOV2_REG4),
    "dinov2_vitl14_reg4": BackbonePreset("vit_large", _DINOV2_REG4),
    "dinov2_vitg14": BackbonePreset("vit_giant2", _DINOV2_GIANT),
    "dinov2_vitg14_reg4": BackbonePreset("vit_giant2", dataclasses.replace(_DINOV2_GIANT, num_register_tokens=4)),
    "dinov3_vits16": BackbonePreset("vit_small", _DINOV3),
    "dinov3_vitb16": BackbonePreset("vit_base", _DINOV3),
    "dinov3_vitl16": BackbonePreset("vit_large", _DINOV3),
}
# The options a `model.*` config key (and a build_backbone argument) may override; the epsilon is the preset's.
OPTION_KEYS = ("patch_size", "img_size", "num_register_tokens", "layerscale_init", "ffn", "pos_encoding",
               "qkv_bias", "pos_embed_resample")


def arch_names() -> list[str]:
    """Every accepted `model.arch`: the sizes, then the presets."""
    return list(ARCHITECTURES) + list(BACKBONE_PRESETS)


def resolve_arch(name: str, **overrides) -> tuple[ViTArch, BackboneOptions]:
    """(size, options) of architecture `name` with the non-None `overrides` (OPTION_KEYS) applied.

    A `layerscale_init` of 0 turns layer scale off (as DINOv2's `init_values`). ValueError naming the valid
    names for an unknown `name` or option.
    """
    if name in BACKBONE_PRESETS:
        preset = BACKBONE_PRESETS[name]
        size, options = ARCHITECTURES[preset.size], preset.options
    elif name in ARCHITECTURES:
        size, options = ARCHITECTURES[name], BackboneOptions()
    else:
        raise ValueError(f"name must be one of {arch_names()}, got {name!r}")
    unknown = sorted(set(overrides) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown backbone option(s) {unknown}; options: {list(OPTION_KEYS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("layerscale_init") == 0:
        given["layerscale_init"] = None
    return size, dataclasses.replace(options, **given)


def swiglu_hidden_dim(hidden: int) -> int:
    """DINOv2's fused SwiGLU sizing (`SwiGLUFFNFused`): 2/3 of the MLP's hidden width, rounded up to a
    multiple of 8, so a SwiGLU FFN has about the MLP's parameters (DINOv3's `SwiGLUFFN(align_to=8)` agrees)."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8
