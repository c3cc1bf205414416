"""The DINOv2 / DINOv3 backbone options (LayerScale, SwiGLU, 2-D RoPE, registers, qkv bias) and presets.

Oracles: RoPE and a whole DINOv3-style block written out here in float64 (explicit 2 x 2 rotations per
frequency pair, attention as softmax(q k^T / sqrt d) v), SwiGLU and LayerScale as plain torch, the published
parameter counts. Tiny widths (32, two heads of 16) keep the file within a few seconds of CPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from _train_utils import tiny_config, write_image_folder
from torch.utils.flop_counter import FlopCounterMode

from dinovmf.architectures import BACKBONE_PRESETS, swiglu_hidden_dim
from dinovmf.config import load_config
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.models import VisionTransformer, build_backbone
from dinovmf.models.rope import RotaryEmbedding2d, apply_rope
from dinovmf.trainer import Trainer

# A DINOv3-style backbone at test size: RoPE, 2 registers, layer scale, qkv bias (key bias masked), SwiGLU.
DINOV3_STYLE = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2, num_register_tokens=2, layerscale_init=0.1,
                    ffn="swiglu", pos_encoding="rope", qkv_bias=True, layer_norm_eps=1e-5)
# The same options as config overrides on the trainer tests' 2-block ViT-Tiny (patch 8, 32 / 16 px crops).
DINOV3_OVERRIDES = ["model.pos_encoding=rope", "model.num_register_tokens=2", "model.layerscale_init=0.1",
                    "model.ffn=swiglu"]

# Parameters without the iBOT mask token, which timm's ports do not have. The rounded figures are the "Params (M)"
# of timm's model cards (huggingface.co/timm/<name>.lvd142m, .lvd1689m); the exact ones are what timm 1.0.31 counts
# for the same models (num_classes=0), built in a separate venv (tools/compare_timm.py's environment). timm folds
# the register models' CLS position into cls_token (no_embed_class), so it counts one D fewer there than DINOv2's
# own layout, which ours keeps. DINOv3: the `_qkvb` ports, whose query / value biases match the released models;
# DINOv3's model card rounds the same to 21M / 86M / 300M.
PUBLISHED = {  # preset: (timm model, Params (M) on its card, timm's exact count)
    "dinov2_vits14": ("vit_small_patch14_dinov2", 22.1, 22_056_192),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", 86.6, 86_579_712),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", 304.4, 304_367_616),
    "dinov2_vits14_reg4": ("vit_small_patch14_reg4_dinov2", 22.1, 22_057_344),
    "dinov2_vitb14_reg4": ("vit_base_patch14_reg4_dinov2", 86.6, 86_582_016),
    "dinov2_vitl14_reg4": ("vit_large_patch14_reg4_dinov2", 304.4, 304_370_688),
    "dinov2_vitg14": ("vit_giant_patch14_dinov2", 1136.5, 1_136_479_232),
    "dinov2_vitg14_reg4": ("vit_giant_patch14_reg4_dinov2", 1136.5, 1_136_483_840),
    "dinov3_vits16": ("vit_small_patch16_dinov3_qkvb", 21.6, 21_596_160),
    "dinov3_vitb16": ("vit_base_patch16_dinov3_qkvb", 85.7, 85_659_648),
    "dinov3_vitl16": ("vit_large_patch16_dinov3_qkvb", 303.1, 303_128_576),
}


def tiny_dinov3(**kw) -> VisionTransformer:
    return VisionTransformer(**{"img_size": 224, **DINOV3_STYLE, **kw})


# ----------------------------------------------------------------------------------------------- RoPE

def rope_reference(x: torch.Tensor, rows: int, cols: int, prefix: int, scale: float = 1.0) -> torch.Tensor:
    """DINOv3's RoPE in float64, written out: token t = (r, c) of the grid has coordinates
    (2 (r + 1/2) / rows - 1, 2 (c + 1/2) / cols - 1) times `scale`; for i < d/2 the pair (x_i, x_{i + d/2}) turns
    by 2 pi y / p, with y the row coordinate and p = 100^(2i / (d/2)) for i < d/4, else the column coordinate and
    p = 100^(2 (i - d/4) / (d/2)). Prefix tokens are left as they are. x: [B, L, H, d]."""
    x = x.double()
    d = x.shape[-1]
    out = x.clone()
    r, c = torch.div(torch.arange(rows * cols), cols, rounding_mode="floor"), torch.arange(rows * cols) % cols
    y_row = (2 * (r.double() + 0.5) / rows - 1) * scale
    y_col = (2 * (c.double() + 0.5) / cols - 1) * scale
    for i in range(d // 2):
        j, y = (i, y_row) if i < d // 4 else (i - d // 4, y_col)
        angle = 2 * math.pi * y / 100.0 ** (2 * j / (d / 2))
        cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
        a, b = x[:, prefix:, :, i], x[:, prefix:, :, i + d // 2]
        out[:, prefix:, :, i] = a * cos - b * sin
        out[:, prefix:, :, i + d // 2] = b * cos + a * sin
    return out


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("rows, cols", [(14, 14), (6, 6), (3, 5)])  # 224 px and 96 px at patch 16; not square
def test_rope_matches_the_float64_rotation_per_head(head_dim, rows, cols):
    rope = RotaryEmbedding2d(head_dim).eval()
    prefix = 3
    x = torch.randn(2, prefix + rows * cols, 4, head_dim, generator=torch.Generator().manual_seed(rows))
    got = apply_rope(x, *rope.tables(rows, cols, prefix))
    assert got.dtype == torch.float32
    # float32 sin / cos of angles up to 2 pi, and float32 periods: measured max error 1.2e-6 over these cases
    torch.testing.assert_close(got.double(), rope_reference(x, rows, cols, prefix), rtol=0, atol=4e-6)
    assert torch.equal(got[:, :prefix], x[:, :prefix])  # CLS and registers are not rotated, exactly


def test_rope_training_rescales_coordinates_per_block_in_half_to_double():
    model = tiny_dinov3(depth=4).train()
    tables = model.block_ropes(96, 96)  # 6 x 6 patches
    x = torch.randn(1, 3 + 36, 2, 16, generator=torch.Generator().manual_seed(0))
    scales = []
    for sin, cos in tables:
        # the slowest frequency (period 100^(6/8)) turns by a small angle: it reads back the scale of the draw
        period = 100.0 ** (2 * 3 / 8)
        last_col = 2 * (5 + 0.5) / 6 - 1
        scale = math.atan2(sin[-1, 7].item(), cos[-1, 7].item()) * period / (2 * math.pi * last_col)
        scales.append(scale)
        # the scale read back from float32 tables is good to ~5e-7 relative, which the fastest frequency (period
        # 1, coordinates up to 2) turns into ~5e-6 more error than the fixed-grid test above allows
        torch.testing.assert_close(apply_rope(x, sin, cos).double(), rope_reference(x, 6, 6, 3, scale),
                                   rtol=0, atol=1.5e-5)
    assert all(0.5 - 1e-5 <= s <= 2 + 1e-5 for s in scales) and len(set(scales)) == len(scales)
    model.eval()  # the teacher and evaluation: the coordinates as they are, one pair for every block
    sin, cos = model.block_ropes(96, 96)[0]
    torch.testing.assert_close(apply_rope(x, sin, cos).double(), rope_reference(x, 6, 6, 3), rtol=0, atol=4e-6)


# ------------------------------------------------------------------------------------- SwiGLU, LayerScale

def test_swiglu_and_layerscale_match_plain_torch():
    torch.manual_seed(0)
    block = tiny_dinov3().blocks[0].double()
    h = swiglu_hidden_dim(4 * 32)
    assert block.mlp.fc1.weight.shape == (2 * h, 32) and block.mlp.fc2.weight.shape == (32, h)
    x = torch.randn(5, 32, dtype=torch.float64)
    w, b = block.mlp.fc1.weight, block.mlp.fc1.bias
    gate, value = x @ w[:h].T + b[:h], x @ w[h:].T + b[h:]
    expected = (gate * torch.sigmoid(gate) * value) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    torch.testing.assert_close(block.mlp(x), expected, rtol=1e-12, atol=1e-12)
    gamma = torch.full((32,), 0.1).double()  # the init value, as the float32 parameter holds it
    torch.testing.assert_close(block.ls1(x), x * gamma, rtol=0, atol=0)
    # DINOv2's SwiGLUFFNFused sizing: ViT-g (D = 1536, hidden 6144) has w12 [8192, 1536]; ViT-S widths for scale
    assert swiglu_hidden_dim(4 * 1536) == 4096 and swiglu_hidden_dim(4 * 384) == 1024
    assert swiglu_hidden_dim(6 * 384) == 1536  # DINOv3 ViT-S+ (ratio 6): its w1 is [1536, 384]


# ------------------------------------------------------------------------------ a whole block in float64

def reference_forward(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The DINOv3-style model of `tiny_dinov3` written out in float64: tokens [CLS, registers, patches], then
    per block x + g1 * attn(LN1 x) and x + g2 * SwiGLU(LN2 x), q and k of the patches rotated by RoPE, the key
    bias zero; the final LayerNorm. Reads the weights, nothing else, from `model`."""
    B, _, H, W = images.shape
    rows, cols = H // 16, W // 16
    patches = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)
    x = torch.cat((model.cls_token.expand(B, -1, -1), model.reg_token.expand(B, -1, -1),
                   patches.flatten(2).transpose(1, 2)), dim=1)
    prefix, D, heads = 3, 32, 2
    for blk in model.blocks:
        y = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, eps=1e-5)
        qkv = y @ blk.attn.qkv.weight.T + torch.cat((blk.attn.q_bias, torch.zeros(D, dtype=x.dtype), blk.attn.v_bias))
        q, k, v = qkv.reshape(B, -1, 3, heads, D // heads).unbind(2)
        q, k = rope_reference(q, rows, cols, prefix), rope_reference(k, rows, cols, prefix)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(D // heads)
        attn = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(B, -1, D)
        x = x + blk.ls1.gamma * (attn @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        y = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, eps=1e-5)
        gate, value = (y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias).chunk(2, dim=-1)
        x = x + blk.ls2.gamma * ((F.silu(gate) * value) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
    return F.layer_norm(x, (D,), model.norm.weight, model.norm.bias, eps=1e-5)


@pytest.mark.parametrize("size", [224, 96])  # DINOv3's global and local crops
def test_dinov3_style_model_matches_the_float64_reference_at_global_and_local_crops(size):
    torch.manual_seed(0)
    model = tiny_dinov3(depth=2).double().eval()
    with torch.no_grad():  # nonzero biases and gammas, so a dropped term would show
        model.rope.periods.copy_(100.0 ** (2 * torch.arange(4, dtype=torch.float64) / 8))  # exact: tested above
        for blk in model.blocks:
            blk.attn.q_bias.normal_(), blk.attn.v_bias.normal_(), blk.ls1.gamma.normal_(), blk.ls2.gamma.normal_()
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = model.forward_features(images)
    ref = reference_forward(model, images)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["registers"], ref[:, 1:3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["patch"], ref[:, 3:], rtol=1e-10, atol=1e-10)
    assert out["patch"].shape == (2, (size // 16) ** 2, 32)


def test_key_bias_is_masked_and_matters_only_under_rope():
    """A key bias adds q . b to a whole row of scores, which the softmax cancels, unless RoPE rotates it per
    position: the reason RoPE models (DINOv3, timm's Eva) keep it at zero."""
    torch.manual_seed(0)
    learned = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).double().eval()
    rope = tiny_dinov3(img_size=32, patch_size=8).double().eval()
    assert rope.blocks[0].attn.qkv.bias is None and {"q_bias", "v_bias"} <= dict(rope.blocks[0].attn.named_parameters()).keys()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = learned(x)
    with torch.no_grad():
        learned.blocks[0].attn.qkv.bias[32:64].normal_()
    torch.testing.assert_close(learned(x), before, rtol=1e-12, atol=1e-12)
    q, k = torch.randn(2, 19, 2, 16, dtype=torch.float64), torch.randn(2, 19, 2, 16, dtype=torch.float64)
    sin, cos = (t.double() for t in rope.rope.tables(4, 4, 3))
    shift = torch.randn(16, dtype=torch.float64)
    scores = torch.einsum("blhd,bmhd->bhlm", apply_rope(q, sin, cos), apply_rope(k, sin, cos)).softmax(-1)
    biased = torch.einsum("blhd,bmhd->bhlm", apply_rope(q, sin, cos), apply_rope(k + shift, sin, cos)).softmax(-1)
    assert (scores - biased).abs().max() > 1e-3


# ----------------------------------------------------------------------------------- parameters, FLOPs

@pytest.mark.parametrize("name", sorted(BACKBONE_PRESETS))
def test_preset_parameter_counts_equal_the_published_ones(name):
    with torch.device("meta"):
        model = build_backbone(name)
    count = sum(p.numel() for key, p in model.named_parameters() if key != "mask_token")
    _, millions, timm_count = PUBLISHED[name]
    no_embed_class = model.num_register_tokens and model.pos_embed is not None  # timm: one D fewer (docstring)
    assert count == timm_count + (model.embed_dim if no_embed_class else 0)
    assert round(count / 1e6, 1) == millions


def test_gradients_reach_every_parameter_of_the_new_options():
    torch.manual_seed(0)
    model = tiny_dinov3(img_size=32, patch_size=8, depth=2, drop_path_rate=0.1).train()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :5] = True  # iBOT: the mask token replaces patches, RoPE still places them
    out = model.forward_features(images, masks)
    (out["cls"].pow(2).sum() + out["patch"].pow(2).sum() + out["registers"].pow(2).sum()).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert silent == [], f"no gradient reached {silent}"
    assert {"blocks.0.ls1.gamma", "blocks.1.attn.q_bias", "blocks.1.attn.v_bias", "blocks.0.mlp.fc1.weight",
            "reg_token", "mask_token"} <= dict(model.named_parameters()).keys()


@pytest.mark.parametrize("ffn", ["swiglu", "mlp"])
def test_flop_formula_counts_the_ffn_and_rope_models(ffn):
    model = tiny_dinov3(img_size=64, patch_size=16, ffn=ffn, attn_backend="math").eval()  # SDPA is not counted
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 80))
    assert model.forward_flops(64, 80) == counter.get_total_flops()


def test_rope_block_compiles_into_one_graph():
    model = tiny_dinov3(img_size=32, patch_size=8).eval()
    x = model.prepare_tokens(torch.randn(2, 3, 32, 32))
    rope = model.block_ropes(32, 32)[0]
    compiled = torch.compile(model.blocks[0], backend="aot_eager", fullgraph=True)  # a graph break would raise
    torch.testing.assert_close(compiled(x, rope), model.blocks[0](x, rope), rtol=1e-6, atol=1e-6)


def test_attention_maps_include_rope_and_leave_registers_out():
    from dinovmf.eval.attention import cls_attention_maps

    torch.manual_seed(0)
    model = tiny_dinov3(img_size=64, depth=2).eval()
    images = torch.randn(2, 3, 64, 96)  # 4 x 6 patches
    tokens = model.prepare_tokens(images)
    ropes = model.block_ropes(64, 96)
    tokens = model.blocks[0](tokens, ropes[0])
    out, weights = model.blocks[1].forward_with_attention(tokens, ropes[1])
    torch.testing.assert_close(out, model.blocks[1](tokens, ropes[1]), rtol=1e-5, atol=1e-6)  # RoPE is in there
    torch.testing.assert_close(model.last_attention_weights(images), weights, rtol=0, atol=0)
    maps = cls_attention_maps(model, images)
    assert maps.heads.shape == (2, 2, 4, 6) and maps.num_registers == 2
    torch.testing.assert_close(maps.heads.sum(dim=(-2, -1)), torch.ones(2, 2))
    torch.testing.assert_close(maps.cls_mass + maps.register_mass + maps.patch_mass, torch.ones(2, 2))
    assert maps.register_mass.min() > 0


def test_dinov2_presets_resample_their_37x37_grid_with_antialiasing_as_timm():
    from dinovmf.architectures import resolve_arch

    assert all((resolve_arch(name)[1].pos_embed_resample == "antialias") == name.startswith("dinov2")
               for name in BACKBONE_PRESETS)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=518, patch_size=14, embed_dim=32, depth=1, num_heads=2,
                              pos_embed_resample="antialias")
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 7), mode="bicubic", align_corners=False, antialias=True)
    got = model.interpolate_pos_encoding(16, 7)
    assert torch.equal(got[:, 0], model.pos_embed[:, 0])
    torch.testing.assert_close(got[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 16 * 7, 32), rtol=0, atol=0)


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, npatch: int) -> torch.Tensor:
    """The oracle: the original DINO's `interpolate_pos_encoding` (DINOv2's models without registers keep it as
    `interpolate_offset=0.1`), its arithmetic as written there, for a square crop of npatch x npatch patches:
    the learned sqrt(N) x sqrt(N) grid scaled by (npatch + 0.1) / sqrt(N), bicubic, no antialiasing."""
    N, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    w0 = h0 = npatch + 0.1  # "add a small number to avoid floating point error in the interpolation"
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert patch_pos_embed.shape[-2:] == (npatch, npatch)
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("img_size, patch, sizes", [(518, 14, (224, 98)), (224, 16, (96, 160))])
def test_offset_resampling_reproduces_dino_and_dinov2_without_registers(img_size, patch, sizes):
    """`pos_embed_resample=offset` is DINO's +0.1 kludge bit for bit (DINOv2 ViT-S/14's 37 x 37 grid at 224 and
    98 px; DINO ViT-S/16's 14 x 14 at its 96 px local crop and a larger one), and it is not what the exact or the
    antialiased resampling give: the option changes the features."""
    torch.manual_seed(0)
    models = {how: VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=32, depth=1, num_heads=2,
                                     pos_embed_resample=how) for how in ("offset", "exact", "antialias")}
    for model in models.values():
        model.load_state_dict(models["offset"].state_dict())
    for size in sizes:
        n = size // patch
        got = models["offset"].interpolate_pos_encoding(n, n)
        torch.testing.assert_close(got, dino_interpolate_pos_encoding(models["offset"].pos_embed, n), rtol=0, atol=0)
        for other in ("exact", "antialias"):
            assert (got - models[other].interpolate_pos_encoding(n, n)).abs().max() > 1e-3, (size, other)
    assert models["offset"].interpolate_pos_encoding(5, 3).shape == (1, 1 + 15, 32)  # not square: rows, cols kept
    with pytest.raises(ValueError, match="pos_embed_resample must be one of"):
        VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed_resample="bilinear")


# ------------------------------------------------------------------------------------ config and training

@pytest.mark.parametrize("override, message", [
    ("model.arch=dinov2-vits14", "did you mean 'dinov2_vits14'"),
    ("model.ffn=geglu", "model.ffn must be one of"),
    ("model.pos_encoding=sincos", "model.pos_encoding must be one of"),
    ("model.pos_embed_resample=nearest", "model.pos_embed_resample must be one of"),
    ("model.layerscale_init=-1", "model.layerscale_init must be > 0"),
    ("model.num_register_tokens=-1", "model.num_register_tokens must be >= 0"),
    ("model.arch=dinov2_vits14", "crops.local_size (96) must be a multiple of the patch size (14"),
    ("model.img_size=100", "model.img_size (100) must be a multiple of the patch size (16)"),
])
def test_bad_backbone_options_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_presets_resolve_their_options_and_keys_override_them():
    cfg = load_config(None, ["model.arch=dinov2_vits14_reg4", "crops.local_size=98"])
    opts = cfg.backbone
    assert (opts.patch_size, opts.img_size, opts.num_register_tokens, opts.layerscale_init) == (14, 518, 4, 1e-5)
    cfg = load_config(None, ["model.arch=dinov3_vitb16", "model.num_register_tokens=0", "model.layerscale_init=0"])
    assert (cfg.backbone.pos_encoding, cfg.backbone.num_register_tokens, cfg.backbone.layerscale_init) == ("rope", 0, None)
    from dinovmf.models import model_args
    args = model_args(cfg)  # the checkpoint's record rebuilds exactly this backbone
    assert args == {"name": "dinov3_vitb16", "patch_size": 16, "img_size": 224, "num_register_tokens": 0,
                    "layerscale_init": 0}
    with torch.device("meta"):
        model = build_backbone(**args)
    assert model.layerscale_init is None and model.pos_encoding == "rope" and model.layer_norm_eps == 1e-5
    cfg = load_config(None, ["model.arch=dinov2_vitg14", "model.pos_embed_resample=offset", "crops.local_size=98"])
    assert (cfg.backbone.ffn, cfg.backbone.pos_embed_resample) == ("swiglu", "offset")
    args = model_args(cfg)
    assert args == {"name": "dinov2_vitg14", "patch_size": 14, "img_size": 518, "num_register_tokens": 0,
                    "pos_embed_resample": "offset"}
    with torch.device("meta"):
        model = build_backbone(**args)
    assert (model.embed_dim, model.depth, model.num_heads, model.ffn, model.pos_embed_resample) == \
        (1536, 40, 24, "swiglu", "offset")
    # DINO's and iBOT's recipes resample positions for their 96 px crops as DINO's ViT did
    assert all(load_config(name).backbone.pos_embed_resample == "offset"
               for name in ("vit_s16_in1k", "vit_b16_in1k", "ibot_vmf_vit_s16_in1k"))


def test_ibot_training_resume_and_knn_run_on_a_dinov3_style_backbone(tmp_path):
    """Two iBOT-vMF steps on the new blocks (masks, registers, RoPE with its training rescale), then the same
    run stopped after one step and resumed: bitwise the same weights; and the kNN evaluation reads its teacher."""
    from dinovmf.eval.run import knn_for_backbone

    cfg = tiny_config(tmp_path / "unused", None, ["method=ibot_vmf", "steps=2", *DINOV3_OVERRIDES])
    straight = Trainer(cfg, tmp_path / "a", steps_per_epoch=5)
    for step in range(2):
        straight.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=step), step)
    stopped = Trainer(cfg, tmp_path / "b", steps_per_epoch=5)
    stopped.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=0), 0)
    resumed = Trainer.resume(stopped.save(), cfg, tmp_path / "b")
    resumed.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=1), 1)
    for key, value in straight.models.student.state_dict().items():
        assert torch.equal(resumed.models.student.state_dict()[key], value), key
    assert not torch.equal(straight.models.student.backbone.blocks[0].ls1.gamma, torch.full((192,), 0.1))
    data = write_image_folder(tmp_path / "data", "train", 2)
    knn = knn_for_backbone(straight.teacher_backbone(), data, data, 32, 32, "cpu", k=2, loader_backend="pil",
                           num_workers=0)
    assert 0 <= knn["top1"] <= 100
