"""Teacher-backbone export to safetensors (timm key names) and `dinovmf export`."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dinovmf.cli import main as cli_main
from dinovmf.models import DINOHead, MultiCropWrapper, build_backbone, export_teacher_backbone, load_backbone

MODEL_ARGS = {"name": "vit_tiny", "patch_size": 16, "img_size": 32, "num_register_tokens": 0,
              "drop_path_rate": 0.1}


def timm_vit_keys(depth: int, registers: bool) -> set[str]:
    """Parameter names of timm's VisionTransformer (vit_base_patch16_224 layout, num_classes=0),
    written out from timm's naming scheme rather than from our module tree."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    if registers:
        keys.add("reg_token")
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
    return keys


def make_checkpoint(path, model_args=MODEL_ARGS, prefix="", seed=0):
    """A training checkpoint as the trainer writes it; returns the teacher wrapper."""
    torch.manual_seed(seed)
    teacher = MultiCropWrapper(build_backbone(**model_args), DINOHead(192, out_dim=32, hidden_dim=16,
                                                                      bottleneck_dim=8))
    with torch.no_grad():
        teacher.backbone.mask_token.normal_()  # trained mask token: must not leak into the export
    state = {prefix + k: v for k, v in teacher.state_dict().items()}
    torch.save({"step": 7, "teacher": state, "model_args": dict(model_args),
                "rng": {"numpy": __import__("numpy").random.get_state()}}, path)
    return teacher


@pytest.mark.parametrize("registers, depth", [(0, None), (2, None), (0, 3)])
def test_export_round_trip_gives_identical_outputs(tmp_path, registers, depth):
    args = {**MODEL_ARGS, "num_register_tokens": registers, **({"depth": depth} if depth else {})}
    teacher = make_checkpoint(tmp_path / "ckpt.pt", args).eval()
    out = export_teacher_backbone(tmp_path / "ckpt.pt", tmp_path / "export" / "teacher.safetensors")

    assert out == tmp_path / "export" / "teacher.safetensors"
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.json", "teacher.safetensors"]
    tensors = load_file(str(out))
    assert set(tensors) == timm_vit_keys(depth=depth or 12, registers=bool(registers))
    for key, value in tensors.items():
        assert torch.equal(value, teacher.backbone.state_dict()[key])

    config = json.loads(out.with_suffix(".json").read_text())
    assert config["model_args"] == {"name": "vit_tiny", "patch_size": 16, "img_size": 32,
                                    "num_register_tokens": registers, **({"depth": depth} if depth else {})}
    assert config["step"] == 7 and config["embed_dim"] == 192 and config["depth"] == (depth or 12)

    loaded = load_backbone(out)
    assert not loaded.training
    x32, x16 = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for x in (x32, x16):
            assert torch.equal(loaded(x), teacher.backbone(x))


def test_load_falls_back_to_the_safetensors_metadata(tmp_path):
    teacher = make_checkpoint(tmp_path / "ckpt.pt").eval()
    out = export_teacher_backbone(tmp_path / "ckpt.pt", tmp_path / "b.safetensors")
    out.with_suffix(".json").unlink()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_backbone(out)(x), teacher.backbone(x))


def test_ddp_prefixed_checkpoint_exports(tmp_path):
    teacher = make_checkpoint(tmp_path / "ckpt.pt", prefix="module.").eval()
    out = export_teacher_backbone(tmp_path / "ckpt.pt", tmp_path / "b.safetensors")
    assert torch.equal(load_file(str(out))["pos_embed"], teacher.backbone.pos_embed.detach())


def test_invalid_inputs_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_teacher_backbone(tmp_path / "missing.pt", tmp_path / "o.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        export_teacher_backbone(garbage, tmp_path / "o.safetensors")
    torch.save({"student": {}}, tmp_path / "nostudent.pt")
    with pytest.raises(ValueError, match="teacher"):
        export_teacher_backbone(tmp_path / "nostudent.pt", tmp_path / "o.safetensors")
    make_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_teacher_backbone(tmp_path / "ckpt.pt", tmp_path / "o.bin")
    # weights that do not fit the declared architecture
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ckpt["model_args"]["img_size"] = 48
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="does not match"):
        export_teacher_backbone(tmp_path / "mismatch.pt", tmp_path / "o.safetensors")
    ckpt["model_args"] = {"name": "vit_tiny", "lr": 0.1}
    torch.save(ckpt, tmp_path / "badargs.pt")
    with pytest.raises(ValueError, match="lr"):
        export_teacher_backbone(tmp_path / "badargs.pt", tmp_path / "o.safetensors")
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o.*"))  # nothing half-written
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(tmp_path / "o.safetensors")


def test_cli_export(tmp_path, capsys):
    teacher = make_checkpoint(tmp_path / "ckpt.pt").eval()
    out = tmp_path / "teacher.safetensors"
    assert cli_main(["export", str(tmp_path / "ckpt.pt"), str(out)]) == 0
    assert "teacher.safetensors" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_backbone(out)(x), teacher.backbone(x))

    assert cli_main(["export", str(tmp_path / "nope.pt"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
