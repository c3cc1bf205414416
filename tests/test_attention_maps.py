"""Last-block attention maps: the explicit weights, the CLS maps, threshold masks and `dinovmf attention`.

Oracles: the block's own SDPA / math forward (the explicit path must reproduce it), the definition of
a softmax row (sums to one), and the definition of the threshold mask (the fewest largest patches
holding at least the asked mass). Models are random-init tiny ViTs; images come from the embedded
dataset's renderer, written as PNG files.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from _train_utils import write_image_folder
from dinovmf.cli import main as cli_main
from dinovmf.eval.attention import cls_attention_maps, load_image, threshold_mask, write_attention_maps
from dinovmf.models import build_backbone, export_teacher_backbone
from dinovmf.models.attention import math_attention


def tiny_vit(patch=8, registers=0, depth=2, backend="sdpa", img_size=32):
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=patch, img_size=img_size, num_register_tokens=registers,
                          depth=depth, attn_backend=backend).eval()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("registers", [0, 4])
def test_explicit_attention_reproduces_the_block_output(backend, registers):
    model = tiny_vit(registers=registers, backend=backend)
    tokens = model.prepare_tokens(torch.randn(3, 3, 32, 32))
    block = model.blocks[-1]
    with torch.no_grad():
        out, weights = block.forward_with_attention(tokens)
        torch.testing.assert_close(out, block(tokens), rtol=1e-5, atol=1e-5)
        L = tokens.shape[1]
        assert weights.shape == (3, model.num_heads, L, L)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, model.num_heads, L))
        # and the weights are the ones the reference attention multiplies v by
        q, k, v = block.attn._qkv(block.norm1(tokens))
        torch.testing.assert_close((weights @ v.transpose(1, 2)).transpose(1, 2), math_attention(q, k, v))


def test_last_attention_weights_are_those_of_the_last_block_on_the_forward_tokens():
    model = tiny_vit(depth=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        final, expected = model.blocks[-1].forward_with_attention(tokens)
        torch.testing.assert_close(model.norm(final)[:, 0], model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.last_attention_weights(x), expected)


@pytest.mark.parametrize("patch, registers, size", [(8, 0, 32), (8, 4, 48), (16, 0, 64), (16, 2, 32)])
def test_cls_maps_have_the_patch_grid_and_sum_to_one_per_head(patch, registers, size):
    model = tiny_vit(patch=patch, registers=registers)
    maps = cls_attention_maps(model, torch.randn(2, 3, size, size))
    grid = size // patch
    assert maps.heads.shape == (2, model.num_heads, grid, grid) and maps.mean.shape == (2, grid, grid)
    ones = torch.ones(2, model.num_heads)
    # The CLS row is a softmax over CLS + registers + patches; the maps are its patch part, renormalised.
    assert maps.cls_row.shape == (2, model.num_heads, 1 + registers + grid * grid)
    torch.testing.assert_close(maps.cls_row.sum(-1), ones)
    torch.testing.assert_close(maps.heads.sum((-2, -1)), ones)
    torch.testing.assert_close(maps.mean.sum((-2, -1)), torch.ones(2))
    torch.testing.assert_close(maps.cls_mass + maps.register_mass + maps.patch_mass, ones)
    assert (maps.register_mass > 0).all() if registers else (maps.register_mass == 0).all()
    expected = maps.cls_row[..., 1 + registers:] / maps.patch_mass[..., None]
    torch.testing.assert_close(maps.heads.flatten(-2), expected)


@pytest.mark.parametrize("mass", [0.05, 0.6, 0.9, 1.0])
def test_threshold_mask_keeps_the_fewest_largest_patches_holding_the_mass(mass):
    g = torch.Generator().manual_seed(0)
    maps = torch.softmax(3 * torch.randn(5, 3, 6, 6, generator=g), dim=-1)
    maps = maps / maps.sum((-2, -1), keepdim=True)
    masks = threshold_mask(maps, mass)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    for m, keep in zip(maps.reshape(-1, 36).double(), masks.reshape(-1, 36)):
        kept, target = m[keep], mass * m.sum()  # relative to the map's sum (1 up to fp32 rounding)
        assert kept.sum() >= target                            # at least the asked mass
        assert kept.min() >= m[~keep].max() if (~keep).any() else True  # the largest ones
        assert kept.sum() - kept.min() < target                # and no more patches than needed
    with pytest.raises(ValueError, match="threshold"):
        threshold_mask(maps, 0.0)


def _images(tmp_path, n=2):
    folder = write_image_folder(tmp_path / "imgs", "val", per_class=1, size=64)
    return sorted(folder.rglob("*.png"))[:n]


def _checkpoint(tmp_path, registers=0):
    """A training checkpoint of a random-init tiny ViT/8 (teacher != student), as the trainer writes it."""
    model_args = {"name": "vit_tiny", "patch_size": 8, "img_size": 32, "num_register_tokens": registers,
                  "depth": 2}
    states = {}
    for which, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        states[which] = {f"backbone.{k}": v for k, v in build_backbone(**model_args).state_dict().items()}
    path = tmp_path / "step_0000010.pt"
    torch.save({"step": 10, "model_args": model_args, "config": {}, **states}, path)
    return path


@pytest.mark.parametrize("registers", [0, 2])
def test_attention_command_writes_maps_for_a_checkpoint_and_its_export(tmp_path, capsys, registers):
    ckpt, images = _checkpoint(tmp_path, registers), _images(tmp_path)
    export = export_teacher_backbone(ckpt, tmp_path / "teacher.safetensors")
    outputs = {}
    for name, model in (("ckpt", ckpt), ("export", export)):
        out = tmp_path / name
        argv = ["attention", str(model), *map(str, images), "--out", str(out), "--image-size", "48",
                "--threshold", "0.6"]
        assert cli_main(argv) == 0
        printed = capsys.readouterr().out
        assert "6x6 patches of 8" in printed and "3 heads" in printed and "attention_overview.png" in printed
        assert ("registers" in printed) == bool(registers)
        stem = images[0].stem
        for label in ("head0", "head1", "head2", "mean"):
            for kind in ("", "mask_"):
                with Image.open(out / f"{stem}_{kind}{label}.png") as im:
                    assert im.size == (240, 240)  # 48 px x 5 (enlarged to >= 224 for viewing)
        mask = np.asarray(Image.open(out / f"{stem}_mask_mean.png"))
        assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
        assert (out / "attention_overview.png").stat().st_size > 0
        outputs[name] = np.asarray(Image.open(out / f"{stem}_mean.png"))
    # The export holds the checkpoint's teacher: the same maps.
    np.testing.assert_array_equal(outputs["ckpt"], outputs["export"])
    # The student is a different network: different maps.
    assert cli_main(["attention", str(ckpt), str(images[0]), "--out", str(tmp_path / "s"), "--image-size", "48",
                     "--which", "student"]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "s" / f"{images[0].stem}_mean.png")),
                              outputs["ckpt"])


def test_attention_command_errors_name_the_bad_input(tmp_path, capsys):
    ckpt, images = _checkpoint(tmp_path), _images(tmp_path, 1)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    export = export_teacher_backbone(ckpt, tmp_path / "teacher.safetensors")
    cases = [
        ([str(ckpt), str(tmp_path / "missing.jpg")], "missing.jpg' does not exist"),
        ([str(ckpt), str(corrupt)], "corrupt.png' cannot be read as an image"),
        ([str(tmp_path / "nope.pt"), str(images[0])], "nope.pt' does not exist"),
        ([str(ckpt), str(images[0]), "--image-size", "36"], "multiple of the patch size 8"),
        ([str(ckpt), str(images[0]), "--threshold", "1.5"], "threshold must be in (0, 1]"),
        ([str(export), str(images[0]), "--which", "student"], "holds the teacher backbone only"),
        ([str(ckpt), str(tmp_path / "empty_dir")], "holds no images"),
    ]
    (tmp_path / "empty_dir").mkdir()
    for args, message in cases:
        out = tmp_path / "out"
        assert cli_main(["attention", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert "dinovmf attention: error:" in err and message in err and "Traceback" not in err, err
        assert not out.exists()  # nothing written for bad input


def test_load_image_centre_crops_to_a_square(tmp_path):
    path = tmp_path / "wide.png"
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the central square is white
    Image.fromarray(wide).save(path)
    img = load_image(path, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert img.mean() > 245  # the white centre (a squashed or off-centre crop would be ~half black)


def test_write_attention_maps_without_threshold_writes_no_masks(tmp_path):
    model = tiny_vit()
    images = _images(tmp_path, 1)
    summaries = write_attention_maps(model, images, tmp_path / "out", 32)
    assert len(summaries) == 1 and not list((tmp_path / "out").glob("*mask*"))
    assert len(summaries[0]["files"]) == model.num_heads + 1
