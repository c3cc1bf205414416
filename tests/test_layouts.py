"""The layouts released backbones come in (timm's, DINOv2's and DINOv3's), read by `model.init_from` and
written by `dinovmf export --layout`.

Each layout's file is written here, key by key, from the naming of the code that reads it (facebookresearch/dinov2
and dinov3's `DinoVisionTransformer`, timm's `VisionTransformer` and `Eva`), with weights made by the test; a
backbone loaded from it computes bitwise what the source computes, and an export in that layout is that file.
"""
import pytest
import torch
from _train_utils import TINY_OVERRIDES, write_image_folder

from dinovmf.cli import main
from dinovmf.models import build_backbone, export_teacher_backbone, load_backbone
from dinovmf.models.init_from import InitFromError, InitKeysError, load_init_weights

BASE = {"name": "vit_tiny", "depth": 2, "patch_size": 8, "img_size": 32}
DINOV2 = {**BASE, "num_register_tokens": 4, "layerscale_init": 1e-5}
DINOV3 = {**DINOV2, "pos_encoding": "rope"}
SUBS = ("norm1", "attn.proj", "norm2")  # weight + bias, the same name in every layout


def source(args: dict, seed: int = 3, layout: str = "dinov3"):
    """A backbone whose every tensor is random (gammas, biases, mask token too), so a mis-mapped one shows. RoPE
    periods as the layout's models have them: DINOv3 stores them rounded to bfloat16, timm computes float32 ones."""
    torch.manual_seed(seed)
    model = build_backbone(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias", "mask_token")):
                p.normal_()
        if model.rope is not None and layout == "dinov3":
            model.rope.periods.copy_(model.rope.periods.bfloat16().float())
    return model.eval()


def features(model, size: int = 32) -> torch.Tensor:
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        out = model.eval().forward_features(images)
    return torch.cat([out["cls"], out["patch"].flatten(1)], dim=1)


def block_common(sd: dict, i: int) -> dict:
    b = f"blocks.{i}."
    return {f"{b}{sub}.{p}": sd[f"{b}{sub}.{p}"] for sub in SUBS for p in ("weight", "bias")}


def dinov2_file(model, chunked: bool = False) -> dict:
    """facebookresearch/dinov2's `.pth` of `model`: register_tokens, mask_token, ls1/ls2.gamma, the SwiGLU as
    mlp.w12 / mlp.w3; with `chunked`, training-checkpoint block names `blocks.<chunk>.<i>.` (one block a chunk)."""
    sd = model.state_dict()
    out = {"cls_token": sd["cls_token"], "pos_embed": sd["pos_embed"], "register_tokens": sd["reg_token"],
           "mask_token": sd["mask_token"], "patch_embed.proj.weight": sd["patch_embed.proj.weight"],
           "patch_embed.proj.bias": sd["patch_embed.proj.bias"], "norm.weight": sd["norm.weight"],
           "norm.bias": sd["norm.bias"]}
    fc1, fc2 = ("mlp.w12", "mlp.w3") if model.ffn == "swiglu" else ("mlp.fc1", "mlp.fc2")
    for i in range(model.depth):
        b, name = f"blocks.{i}.", f"blocks.{i}.{i}." if chunked else f"blocks.{i}."
        block = {**block_common(sd, i), f"{b}attn.qkv.weight": sd[f"{b}attn.qkv.weight"],
                 f"{b}attn.qkv.bias": sd[f"{b}attn.qkv.bias"], f"{b}ls1.gamma": sd[f"{b}ls1.gamma"],
                 f"{b}ls2.gamma": sd[f"{b}ls2.gamma"]}
        for ours, theirs in (("mlp.fc1", fc1), ("mlp.fc2", fc2)):
            block |= {f"{b}{theirs}.{p}": sd[f"{b}{ours}.{p}"] for p in ("weight", "bias")}
        out |= {name + k[len(b):]: v for k, v in block.items()}
    return out


def dinov3_file(model) -> dict:
    """facebookresearch/dinov3's `.pth` of `model`: storage_tokens, rope_embed.periods, attn.qkv.bias with the key
    part zero and bias_mask (1, 0, 1), ls1/ls2.gamma, mask_token, a SwiGLU as mlp.w1 / w2 / w3."""
    sd = model.state_dict()
    D = model.embed_dim
    out = {"cls_token": sd["cls_token"], "storage_tokens": sd["reg_token"], "mask_token": sd["mask_token"],
           "rope_embed.periods": sd["rope.periods"], "patch_embed.proj.weight": sd["patch_embed.proj.weight"],
           "patch_embed.proj.bias": sd["patch_embed.proj.bias"], "norm.weight": sd["norm.weight"],
           "norm.bias": sd["norm.bias"]}
    for i in range(model.depth):
        b = f"blocks.{i}."
        out |= {**block_common(sd, i), f"{b}attn.qkv.weight": sd[f"{b}attn.qkv.weight"],
                f"{b}attn.qkv.bias": torch.cat((sd[f"{b}attn.q_bias"], torch.zeros(D), sd[f"{b}attn.v_bias"])),
                f"{b}attn.qkv.bias_mask": torch.cat((torch.ones(D), torch.zeros(D), torch.ones(D))),
                f"{b}ls1.gamma": sd[f"{b}ls1.gamma"], f"{b}ls2.gamma": sd[f"{b}ls2.gamma"],
                f"{b}mlp.w3.weight": sd[f"{b}mlp.fc2.weight"], f"{b}mlp.w3.bias": sd[f"{b}mlp.fc2.bias"]}
        if model.ffn == "swiglu":
            for p in ("weight", "bias"):
                out[f"{b}mlp.w1.{p}"], out[f"{b}mlp.w2.{p}"] = sd[f"{b}mlp.fc1.{p}"].chunk(2)
        else:
            out |= {f"{b}mlp.fc1.{p}": sd[f"{b}mlp.fc1.{p}"] for p in ("weight", "bias")}
            out |= {f"{b}mlp.fc2.{p}": out.pop(f"{b}mlp.w3.{p}") for p in ("weight", "bias")}
    return out


def timm_file(model) -> dict:
    """timm's port: `vit_*_patch14_reg4_dinov2` (no_embed_class: pos_embed over the patches, the CLS position in
    cls_token) or `Eva` for `vit_*_patch16_dinov3[_qkvb]` (gamma_1 / gamma_2, q_bias / v_bias, no periods); neither
    has a mask token."""
    sd = model.state_dict()
    out = {k: sd[k] for k in ("reg_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                              "norm.bias")}
    if model.rope is None:
        out |= {"cls_token": sd["cls_token"] + sd["pos_embed"][:, :1], "pos_embed": sd["pos_embed"][:, 1:]}
    else:
        out["cls_token"] = sd["cls_token"]
    for i in range(model.depth):
        b = f"blocks.{i}."
        out |= {**block_common(sd, i), f"{b}attn.qkv.weight": sd[f"{b}attn.qkv.weight"]}
        out |= {f"{b}{sub}.{p}": sd[f"{b}{sub}.{p}"] for sub in ("mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
        if model.rope is None:
            out |= {f"{b}attn.qkv.bias": sd[f"{b}attn.qkv.bias"], f"{b}ls1.gamma": sd[f"{b}ls1.gamma"],
                    f"{b}ls2.gamma": sd[f"{b}ls2.gamma"]}
        else:
            out |= {f"{b}gamma_1": sd[f"{b}ls1.gamma"], f"{b}gamma_2": sd[f"{b}ls2.gamma"]}
            out |= {f"{b}attn.{k}": sd[f"{b}attn.{k}"] for k in ("q_bias", "v_bias") if f"{b}attn.{k}" in sd}
    return out


FILES = {"dinov2": dinov2_file, "dinov3": dinov3_file, "timm": timm_file}
CASES = [  # (layout, architecture, how the file is written)
    ("dinov2", DINOV2, {}), ("dinov2", {**DINOV2, "ffn": "swiglu"}, {}), ("dinov2", DINOV2, {"chunked": True}),
    ("dinov3", DINOV3, {}), ("dinov3", {**DINOV3, "ffn": "swiglu"}, {}),
    ("timm", DINOV2, {}), ("timm", DINOV3, {}), ("timm", {**DINOV3, "qkv_bias": False}, {}),
]


@pytest.mark.parametrize("layout, args, how", CASES)
def test_each_layout_loads_with_the_source_outputs(tmp_path, layout, args, how):
    src = source(args, layout=layout)
    path = tmp_path / "weights.pth"
    torch.save(FILES[layout](src, **how) | {"head.weight": torch.zeros(3, 192)}, path)  # timm's classifier: dropped
    model = source(args, seed=4, layout=layout)  # other weights everywhere, so a key left out would show
    report = load_init_weights(model, path)
    assert f"({'state dict'}, {layout} layout)" in report
    assert torch.equal(features(model), features(src))
    assert torch.equal(features(model, 16), features(src, 16))  # another crop size: interpolation / RoPE grid


@pytest.mark.parametrize("layout, args", [(layout, args) for layout, args, how in CASES if not how])
def test_export_in_each_layout_is_that_layouts_file_and_loads_back(tmp_path, layout, args):
    src = source(args, layout=layout)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"step": 5, "teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()},
                "model_args": args}, ckpt)
    out = export_teacher_backbone(ckpt, tmp_path / f"teacher.{'safetensors' if layout == 'timm' else 'pth'}", layout)
    written = (torch.load(out, weights_only=True) if out.suffix == ".pth"
               else __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out)))
    expected = FILES[layout](src)
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(written[key], value), key
    assert torch.equal(features(load_backbone(out)), features(src))
    fresh = source(args, seed=5, layout=layout)
    load_init_weights(fresh, out)
    assert torch.equal(features(fresh), features(src))


def test_export_refuses_a_layout_that_cannot_hold_the_backbone(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source(DINOV3).state_dict().items()},
                "model_args": DINOV3}, ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "o.pth"), "--layout", "dinov2"]) == 2
    assert "layout dinov2 holds learned position embeddings; this backbone uses RoPE" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(tmp_path / "o.pth"), "--layout", "dinov3"]) == 0
    assert "(dinov3 layout)" in capsys.readouterr().out


def test_an_unknown_layout_names_the_layouts_tried_and_the_keys(tmp_path):
    hf = {"embeddings.cls_token": torch.zeros(1, 1, 8), "encoder.layer.0.attention.query.weight": torch.zeros(8, 8)}
    path = tmp_path / "hf.pth"
    torch.save(hf, path)
    with pytest.raises(InitFromError) as info:
        load_init_weights(build_backbone(**BASE), path)
    message = str(info.value)
    for expected in ("not a ViT backbone in any known layout", "dinov3: storage_tokens", "dinov2: register_tokens",
                     "timm: blocks.N.gamma_1", "dinovmf: cls_token", "embeddings.cls_token"):
        assert expected in message, message


def test_a_dinov3_file_into_a_learned_position_model_names_both_architectures_and_the_fix(tmp_path):
    path = tmp_path / "dinov3.pth"
    torch.save(dinov3_file(source(DINOV3)), path)
    with pytest.raises(InitKeysError) as info:
        load_init_weights(build_backbone(**BASE), path)
    message = str(info.value)
    assert ("file: 2 blocks, width 192, patch 8, mlp FFN, rope positions, 4 registers, layer scale, qkv bias; "
            "model: 2 blocks, width 192, patch 8, mlp FFN, learned positions, 0 registers, no layer scale, "
            "qkv bias") in message
    assert ("to build the file's architecture: model.pos_encoding=rope model.num_register_tokens=4 "
            "model.layerscale_init=1e-5") in message
    timm_no_bias = tmp_path / "timm.pth"  # timm's vit_*_patch16_dinov3 drop the (zero) qkv biases
    torch.save(timm_file(source({**DINOV3, "qkv_bias": False})), timm_no_bias)
    with pytest.raises(InitKeysError, match="model.qkv_bias=false"):
        load_init_weights(build_backbone(**DINOV3), timm_no_bias)


def test_dinov3_files_with_another_rope_or_an_unmasked_key_bias_are_refused(tmp_path):
    model = source(DINOV3)
    other_base = dinov3_file(model) | {"rope_embed.periods": 10000.0 ** (2 * torch.arange(16) / 32)}  # base 1e4
    torch.save(other_base, tmp_path / "base.pth")
    with pytest.raises(InitFromError, match="RoPE periods differ"):
        load_init_weights(build_backbone(**DINOV3), tmp_path / "base.pth")
    unmasked = dinov3_file(model)
    del unmasked["blocks.1.attn.qkv.bias_mask"]
    unmasked["blocks.1.attn.qkv.bias"] = torch.randn(3 * 192)  # trained without mask_k_bias
    torch.save(unmasked, tmp_path / "unmasked.pth")
    with pytest.raises(InitFromError, match="nonzero key bias and no bias_mask"):
        load_init_weights(build_backbone(**DINOV3), tmp_path / "unmasked.pth")


def test_train_starts_from_a_dinov2_release_with_a_preset_like_config(tmp_path, capsys):
    """The command a user runs, at test size: a DINOv2-layout file, the run's backbone options on the command line."""
    src = source(DINOV2)
    torch.save(dinov2_file(src), tmp_path / "dinov2_pretrain.pth")
    data = write_image_folder(tmp_path / "data", "train", 1)
    args = ["train", "--out", str(tmp_path / "run"), *TINY_OVERRIDES, f"data.train={data}", "data.val=null",
            "steps=1", "model.num_register_tokens=4", "model.layerscale_init=1e-5",
            f"model.init_from={tmp_path / 'dinov2_pretrain.pth'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(state dict, dinov2 layout): loaded 36 of the backbone's 36 tensors" in out, out


def test_a_dinov2_model_without_registers_names_the_resampling_that_reproduces_it(tmp_path):
    """DINOv2's ViT-S/B/L/g without registers resample positions with DINO's +0.1 offset; timm's port and the
    presets do not, and the keys cannot tell the two files apart: loading one says which option reproduces
    DINOv2's own model, and says nothing once it is set or for a register model."""
    args = {"name": "vit_tiny", "depth": 1, "patch_size": 14, "img_size": 518, "layerscale_init": 1e-5}
    path = tmp_path / "dinov2_vits14_like.pth"
    torch.save(source(args).state_dict(), path)
    hint = "model.pos_embed_resample=offset reproduces DINOv2's features there"
    assert hint in load_init_weights(build_backbone(**args, pos_embed_resample="antialias"), path)
    assert hint not in load_init_weights(build_backbone(**args, pos_embed_resample="offset"), path)
    reg = {**args, "num_register_tokens": 4}
    torch.save(dinov2_file(source(reg)), tmp_path / "reg4.pth")
    assert hint not in load_init_weights(build_backbone(**reg, pos_embed_resample="antialias"), tmp_path / "reg4.pth")
