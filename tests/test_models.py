"""ViT backbones, attention backends, DINO head and multi-crop wrapper (dinovmf.models).

Oracles: timm's published parameter counts, float64 `math` attention, per-crop backbone calls (for
grouping / packing / view-major order), torch's FlopCounterMode (for the FLOP formulas).
Small shapes (vit_tiny at 32 px unless a test is about 224/96 crops) keep the file well under 90 s.
"""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import requires_cuda
from dinovmf.models import (DINOHead, MultiCropWrapper, build_backbone, xformers_available)
from dinovmf.models.attention import attend, math_attention
from dinovmf.models.vit import DropPath

# timm's parameter counts of the same backbones with num_classes=0 (vit_small/base/large_patch16_224):
# timm lists 22.1M / 86.6M / 304.3M with the 1000-class head, i.e. these plus (D + 1) * 1000.
TIMM_BACKBONE_PARAMS = {"vit_small": 21_665_664, "vit_base": 85_798_656, "vit_large": 303_301_632}
PUBLISHED_MILLIONS = {"vit_small": 21.7, "vit_base": 85.8, "vit_large": 303.3}


def small_vit(**kw):
    """vit_tiny at 32 px (2x2 patches of 16): the full 12-block architecture at negligible cost."""
    kw.setdefault("img_size", 32)
    return build_backbone("vit_tiny", **kw)


def small_head(in_dim=192, **kw):
    return DINOHead(in_dim, out_dim=kw.pop("out_dim", 64), hidden_dim=kw.pop("hidden_dim", 48),
                    bottleneck_dim=kw.pop("bottleneck_dim", 16), **kw)


def standard_param_count(model):
    """Parameters of the standard ViT: DINO's / timm's count has no iBOT mask token."""
    return sum(p.numel() for name, p in model.named_parameters() if name != "mask_token")


# ------------------------------------------------------------------------------------------------
# Backbone construction
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TIMM_BACKBONE_PARAMS))
def test_parameter_counts_match_standard_vits(name):
    with torch.device("meta"):  # no memory, no init cost, even for ViT-L
        model = build_backbone(name, patch_size=16)
    count = standard_param_count(model)
    assert count == TIMM_BACKBONE_PARAMS[name]
    assert round(count / 1e6, 1) == PUBLISHED_MILLIONS[name]
    assert model.mask_token.numel() == model.embed_dim


def test_depth_overrides_the_number_of_blocks():
    shallow = build_backbone("vit_tiny", img_size=32, depth=4)
    assert len(shallow.blocks) == shallow.depth == 4
    assert shallow.embed_dim == 192 and shallow.blocks[0].attn.num_heads == 3
    # The drop-path rates still grow linearly to drop_path_rate over the (now 4) blocks.
    rates = [b.drop_path.drop_prob for b in build_backbone("vit_tiny", img_size=32, depth=4,
                                                           drop_path_rate=0.3).blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_registers_and_patch8_change_the_count_as_expected():
    with torch.device("meta"):
        base = build_backbone("vit_small")
        regs = build_backbone("vit_small", num_register_tokens=4)
        p8 = build_backbone("vit_small", patch_size=8)
    D = base.embed_dim
    assert standard_param_count(regs) - standard_param_count(base) == 4 * D
    # patch 8: 4x the position embeddings of the patches, a quarter of the conv weight
    assert standard_param_count(p8) - standard_param_count(base) == (784 - 196) * D - (256 - 64) * 3 * D
    assert p8.patch_embed.grid_size == 28


def test_dino_initialisation(seed):
    model = build_backbone("vit_tiny")
    weights = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks]
                        + [b.mlp.fc1.weight.flatten() for b in model.blocks])
    assert abs(weights.std().item() - 0.02) < 0.001
    assert abs(model.pos_embed.std().item() - 0.02) < 0.001
    for block in model.blocks:
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert torch.count_nonzero(lin.bias) == 0
        for ln in (block.norm1, block.norm2):
            assert torch.all(ln.weight == 1) and torch.count_nonzero(ln.bias) == 0
    assert torch.count_nonzero(model.mask_token) == 0


def test_drop_path_rates_grow_linearly_and_drop_whole_samples(seed):
    model = small_vit(drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(b - a == pytest.approx(0.3 / 11) for a, b in zip(rates, rates[1:]))

    dp = DropPath(0.25).train()
    out = dp(torch.ones(20000, 3, 4))
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))  # whole rows
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.015)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)  # unbiased
    x = torch.randn(4, 5)
    assert torch.equal(dp.eval()(x), x)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="name"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="attn_backend"):
        build_backbone("vit_tiny", img_size=32, attn_backend="flash")
    with pytest.raises(ValueError, match="img_size"):
        build_backbone("vit_tiny", img_size=40)
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_backbone("vit_tiny", img_size=32, drop_path_rate=1.5)
    for depth in (0, 2.5, True):
        with pytest.raises(ValueError, match="depth"):
            build_backbone("vit_tiny", img_size=32, depth=depth)
    model = small_vit()
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 24, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="masks"):
        model.forward_features(torch.randn(2, 3, 32, 32), masks=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_dim"):
        small_head()(torch.randn(2, 100))


@pytest.mark.skipif(xformers_available(), reason="xformers is installed here")
def test_xformers_without_the_package_fails_at_build_time():
    with pytest.raises(RuntimeError, match="xformers"):
        build_backbone("vit_tiny", img_size=32, attn_backend="xformers")


# ------------------------------------------------------------------------------------------------
# Tokens: position embeddings, registers, masks
# ------------------------------------------------------------------------------------------------
def test_pos_embed_interpolation(seed):
    model = small_vit(img_size=64)  # learned grid 4x4
    assert model.interpolate_pos_encoding(4, 4) is model.pos_embed  # native size: untouched
    pos = model.interpolate_pos_encoding(6, 3)
    assert pos.shape == (1, 1 + 18, 192)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # CLS position kept
    # Transposing the learned grid transposes the resampled one (rows/cols handled consistently).
    grid = model.pos_embed.detach()[:, 1:].reshape(4, 4, -1)
    with torch.no_grad():
        model.pos_embed[:, 1:] = grid.transpose(0, 1).reshape(1, 16, -1)
        swapped = model.interpolate_pos_encoding(3, 6)[:, 1:].reshape(3, 6, -1)
    assert torch.allclose(swapped.transpose(0, 1), pos[:, 1:].reshape(6, 3, -1), atol=1e-6)
    # Bicubic weights sum to one: a constant grid stays constant at any size.
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.37
    assert torch.allclose(model.interpolate_pos_encoding(7, 5)[:, 1:], torch.tensor(0.37), atol=1e-6)


def test_tokens_layout_with_registers_and_masks(seed):
    model = small_vit(img_size=48, num_register_tokens=3)  # 3x3 patches
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 48, 48)
    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[0, [1, 5]] = True
    tokens = model.prepare_tokens(x, masks)
    plain = model.prepare_tokens(x)
    assert tokens.shape == (2, 1 + 3 + 9, 192)
    regs = model.reg_token.expand(2, -1, -1)
    assert torch.equal(tokens[:, 1:4], regs)  # registers: no position embedding
    patch_pos = model.pos_embed[0, 1:]
    expected = model.mask_token[0] + patch_pos[[1, 5]]
    assert torch.allclose(tokens[0, 4 + torch.tensor([1, 5])], expected)
    unmasked = ~masks
    assert torch.equal(tokens[:, 4:][unmasked], plain[:, 4:][unmasked])
    feats = model.forward_features(x, masks)
    assert feats["registers"].shape == (2, 3, 192) and feats["patch"].shape == (2, 9, 192)
    assert torch.equal(model.forward_features(x, torch.zeros_like(masks))["cls"], model(x))


# ------------------------------------------------------------------------------------------------
# Attention backends
# ------------------------------------------------------------------------------------------------
def _qkv(B=2, L=23, H=3, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, L, H, d, generator=g, dtype=dtype) for _ in range(3)]


def test_sdpa_and_math_agree_with_float64_reference():
    q, k, v = _qkv()
    ref = math_attention(q.double(), k.double(), v.double())
    for backend in ("sdpa", "math"):
        out = attend(q, k, v, backend)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


def test_sdpa_and_math_models_agree(seed):
    torch.manual_seed(3)
    sdpa = small_vit(img_size=48, num_register_tokens=2)
    torch.manual_seed(3)
    ref = small_vit(img_size=48, num_register_tokens=2, attn_backend="math")
    assert all(torch.equal(a, b) for a, b in zip(sdpa.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(sdpa(x), ref(x), atol=2e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.skipif(not xformers_available(), reason="needs xformers")
def test_xformers_matches_math_on_gpu():
    q, k, v = (t.cuda() for t in _qkv(L=40, d=32))
    ref = math_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(attend(q, k, v, "xformers").double(), ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Head
# ------------------------------------------------------------------------------------------------
def test_head_outputs_unit_rows_and_weight_normalised_prototypes(seed):
    head = small_head(norm_last_layer=False)
    with torch.no_grad():
        head.g.uniform_(0.5, 2.0)
    z = head(torch.randn(7, 5, 192))
    assert z.shape == (7, 5, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(7, 5))
    W = head.prototypes()
    v, g = head.v.detach().double(), head.g.detach().double()
    expected = g[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(W.double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(W.norm(dim=1).double(), g.abs())
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [48, 48, 16]


def test_norm_last_layer_freezes_the_prototype_norms(seed):
    frozen = small_head(norm_last_layer=True)
    trained = small_head(norm_last_layer=False)
    assert not frozen.g.requires_grad and trained.g.requires_grad
    torch.testing.assert_close(frozen.prototypes().norm(dim=1), torch.ones(64))
    x = torch.randn(4, 192)
    for head in (frozen, trained):
        (head(x) @ head.prototypes().T).logsumexp(1).sum().backward()
    assert frozen.g.grad is None and frozen.v.grad is not None
    assert trained.g.grad is not None and torch.count_nonzero(trained.g.grad) > 0


def test_head_rejects_bad_sizes():
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(16, out_dim=0)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(16, nlayers=0)


# ------------------------------------------------------------------------------------------------
# FLOP formulas (used for MFU) against torch's FlopCounterMode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,regs", [((32, 32), 0), ((48, 32), 2)])
def test_flop_formulas_match_flop_counter(size, regs):
    model = small_vit(num_register_tokens=regs, attn_backend="math")
    head = small_head(nlayers=3)
    B = 2
    with FlopCounterMode(display=False) as counter:
        cls = model(torch.randn(B, 3, *size))
        head(cls)
    assert counter.get_total_flops() == B * model.forward_flops(*size) + head.flops(B)


# ------------------------------------------------------------------------------------------------
# Multi-crop wrapper
# ------------------------------------------------------------------------------------------------
def test_multicrop_shapes_2x224_10x96(seed):
    backbone = build_backbone("vit_tiny", num_register_tokens=1)
    model = MultiCropWrapper(backbone, DINOHead(192, out_dim=128), patch_head=DINOHead(192, out_dim=64))
    B = 2
    crops = [torch.randn(B, 3, 224, 224) for _ in range(2)] + [torch.randn(B, 3, 96, 96) for _ in range(10)]
    masks = torch.rand(2 * B, 196) < 0.3
    with torch.no_grad():
        out = model(crops, masks=masks, return_patches=True)
    assert out["z"].shape == (12 * B, 256) and out["cls"].shape == (12 * B, 192)
    assert out["patch"].shape == (2 * B, 196, 192) and out["patch_z"].shape == (2 * B, 196, 256)
    torch.testing.assert_close(out["z"].norm(dim=1), torch.ones(12 * B))
    # View-major: row v*B + b is crop v of image b; global crops see their masks.
    with torch.no_grad():
        for v in (0, 1, 2, 11):
            m = masks[v * B:(v + 1) * B] if v < 2 else None
            alone = backbone.forward_features(crops[v], m)["cls"]
            torch.testing.assert_close(out["cls"][v * B:(v + 1) * B], alone, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_trainable_parameter(seed):
    backbone = small_vit(num_register_tokens=2, drop_path_rate=0.1)
    head = small_head(norm_last_layer=False)
    patch_head = small_head(norm_last_layer=True)
    model = MultiCropWrapper(backbone, head, patch_head).train()
    B = 2
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(3)]
    masks = torch.zeros(2 * B, 4, dtype=torch.bool)
    masks[:, 1] = True  # every image has a masked patch, so the mask token is used
    torch.manual_seed(5)  # a drop-path draw that keeps enough of every block (checked below)
    out = model(crops, masks=masks, return_patches=True)
    loss = (out["z"] @ head.prototypes().T).logsumexp(1).mean() \
        + (out["patch_z"] @ patch_head.prototypes().T).logsumexp(-1).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or torch.count_nonzero(p.grad) == 0)]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert patch_head.g.grad is None  # frozen by norm_last_layer


def test_shared_patch_head_is_registered_once(seed):
    head = small_head()
    model = MultiCropWrapper(small_vit(), head, patch_head=head)
    assert model.patch_head is None
    assert not any(k.startswith("patch_head.") for k in model.state_dict())
    out = model([torch.randn(2, 3, 32, 32)], return_patches=True)
    assert out["patch_z"].shape == (2, 4, 16)


def test_multicrop_rejects_bad_masks_and_batches(seed):
    model = MultiCropWrapper(small_vit(), small_head())
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16)]
    with pytest.raises(ValueError, match="masks"):
        model(crops, masks=torch.zeros(2, 4, dtype=torch.bool))  # needs G*B = 4 rows
    with pytest.raises(ValueError, match="masks"):
        model(crops, masks=[torch.zeros(2, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="same B"):
        model(crops + [torch.randn(3, 3, 16, 16)])


def test_deterministic_under_a_seed():
    def run(seed):
        torch.manual_seed(seed)
        model = MultiCropWrapper(small_vit(drop_path_rate=0.2), small_head()).train()
        crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
        out = model(crops)["z"]
        out.sum().backward()
        return out.detach(), model.backbone.pos_embed.grad.clone(), model.state_dict()

    z1, g1, s1 = run(0)
    z2, g2, s2 = run(0)
    z3, _, s3 = run(1)
    assert torch.equal(z1, z2) and torch.equal(g1, g2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.allclose(z1, z3)  # a different seed really changes something
    assert not math.isclose(s1["head.v"].sum().item(), s3["head.v"].sum().item())
