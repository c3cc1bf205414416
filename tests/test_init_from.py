"""`model.init_from`: continue pretraining from a dinovmf checkpoint or export, or a timm / DINO state dict.

A 2-block ViT-Tiny (patch 8, 32 px: a 4x4 grid) as in the trainer tests. "Identical" below is bitwise:
loading copies tensors, so the loaded network computes exactly what the source network computes.
"""
import argparse

import pytest
import torch
from _train_utils import (TINY_OVERRIDES, check_prototypes_frozen_then_train, tiny_config,
                          write_image_folder)
from safetensors.torch import save_file

from dinovmf.cli import main
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.models import build_backbone, export_teacher_backbone
from dinovmf.models.init_from import InitKeysError, InitShapeError, load_init_weights
from dinovmf.trainer import Trainer

TINY_BACKBONE = {"name": "vit_tiny", "depth": 2, "patch_size": 8, "img_size": 32}


def config(tmp_path, *extra):
    return tiny_config(tmp_path / "unused", None, ["steps=10", *extra])


def features(backbone, seed: int = 0, size: int = 32) -> torch.Tensor:
    """CLS and patch tokens of a fixed batch, in eval mode (no drop-path)."""
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    backbone.eval()
    with torch.no_grad():
        out = backbone.forward_features(images)
    return torch.cat([out["cls"], out["patch"].flatten(1)], dim=1)


def trained_run(tmp_path):
    """A tiny run after one step (so its teacher is not a fresh init): (trainer, checkpoint, export)."""
    cfg = config(tmp_path)
    trainer = Trainer(cfg, tmp_path / "source", steps_per_epoch=5)
    trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 0)
    path = trainer.save()
    return trainer, path, export_teacher_backbone(path, tmp_path / "export" / "teacher.safetensors")


def timm_names(depth: int) -> list[str]:
    """timm's VisionTransformer parameter names, written from its naming scheme, not from our modules."""
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias"]
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
    return names


def source_backbone(seed: int = 3, **args):
    torch.manual_seed(seed)
    return build_backbone(**{**TINY_BACKBONE, **args}).eval()


def save_weights(path, tensors: dict):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_round_trip_gives_identical_backbones_at_step_0(tmp_path, capsys, source):
    run, ckpt_path, export_path = trained_run(tmp_path)
    path = export_path if source == "export" else ckpt_path
    cfg = config(tmp_path, "train.seed=1", f"model.init_from={path}")  # another seed: a fresh init would differ
    capsys.readouterr()
    trainer = Trainer(cfg, steps_per_epoch=5)

    expected = features(run.models.teacher.backbone)
    for net in (trainer.models.student, trainer.models.teacher):
        assert torch.equal(features(net.backbone), expected)
        assert torch.equal(features(net.backbone, seed=1, size=16), features(run.models.teacher.backbone, 1, 16))
    # The head is the fresh one of this seed, not the source run's.
    fresh = Trainer(config(tmp_path, "train.seed=1"), steps_per_epoch=5).models.student.head
    assert torch.equal(trainer.models.student.head.v, fresh.v)
    assert not torch.equal(trainer.models.student.head.v, run.models.teacher.head.v)
    report = capsys.readouterr().out
    if source == "export":  # an export leaves out the training-only mask token and the head
        assert "(dinovmf export, step 1): loaded 30 of the backbone's 31 tensors" in report
        assert "head tensor" not in report
    else:
        assert "(dinovmf checkpoint, teacher at step 1): loaded 31 of the backbone's 31 tensors" in report
        assert "dropped 8 head tensor(s)" in report


def test_eval_baseline_is_the_backbone_the_run_started_from(tmp_path):
    """eval.baseline compares the trained teacher with the step-0 backbone: the seeded random init, or the
    model.init_from weights when the run started from a checkpoint (not a random init it never had)."""
    from dinovmf.train import step0_backbone
    run, _, export_path = trained_run(tmp_path)
    cfg = config(tmp_path, "train.seed=1")
    fresh = Trainer(cfg, steps_per_epoch=5).models.student.backbone
    assert torch.equal(features(step0_backbone(cfg)), features(fresh))
    loaded = step0_backbone(config(tmp_path, "train.seed=1", f"model.init_from={export_path}"))
    assert torch.equal(features(loaded), features(run.models.teacher.backbone))


@pytest.mark.parametrize("name", ["timm.safetensors", "timm.pth", "dino_checkpoint.pth"])
def test_timm_and_dino_state_dicts_load_with_the_source_outputs(tmp_path, name):
    source = source_backbone()
    weights = {key: source.state_dict()[key] for key in timm_names(depth=2)}  # KeyError: a name we lack
    head = {"head.weight": torch.randn(10, 192), "head.bias": torch.zeros(10)}  # timm's classifier: dropped
    if name.startswith("dino"):
        # The original DINO's checkpoint.pth: DDP student and plain teacher, heads, and pickled arguments.
        # The teacher is the one to load; the student here holds other values.
        teacher = {f"backbone.{k}": v for k, v in weights.items()} | {"head.last_layer.weight_g": torch.ones(8, 1)}
        student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in weights.items()}
        torch.save({"student": student, "teacher": teacher, "epoch": 3, "args": argparse.Namespace(arch="vit_tiny")},
                   tmp_path / name)
    else:
        save_weights(tmp_path / name, weights | head)

    trainer = Trainer(config(tmp_path, f"model.init_from={tmp_path / name}"), steps_per_epoch=5)
    assert torch.equal(features(trainer.models.student.backbone), features(source))
    assert torch.equal(features(trainer.models.teacher.backbone), features(source))


def test_dinov2_register_name_maps_to_ours(tmp_path):
    source = source_backbone(num_register_tokens=2)
    weights = {("register_tokens" if k == "reg_token" else k): v for k, v in source.state_dict().items()}
    model = source_backbone(seed=4, num_register_tokens=2)
    load_init_weights(model, save_weights(tmp_path / "dinov2.pth", weights))
    assert torch.equal(model.reg_token, source.reg_token)
    assert torch.equal(features(model), features(source))


def test_position_embeddings_are_resized_to_the_crop_size(tmp_path):
    """Weights learned at 64 px (8x8 grid) start a 32 px run (4x4): pos_embed is resampled once, as the
    source network itself resamples it for a 32 px input, so both compute the same at 32 px; a constant
    field stays constant (bicubic weights sum to 1) and the CLS position is kept as it is."""
    source = source_backbone(img_size=64)
    model = source_backbone(seed=4)
    report = load_init_weights(model, save_weights(tmp_path / "w64.safetensors", source.state_dict()))
    assert "pos_embed resized from a 8x8 to a 4x4 patch grid" in report
    assert model.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(features(model), features(source), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        source.pos_embed[:, 1:] = 0.25
        source.pos_embed[:, 0] = -1.0
    load_init_weights(model, save_weights(tmp_path / "const.safetensors", source.state_dict()))
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])
    torch.testing.assert_close(model.pos_embed[:, 1:], torch.full((1, 16, 192), 0.25), rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, error, expected", [
    ({"depth": 3}, InitKeysError, ["unexpected in the file (12): blocks.2.", "blocks.2.norm2.weight",
                                   "file: 3 blocks"]),
    ({"depth": 1}, InitKeysError, ["missing from the file (12): blocks.1.", "blocks.1.mlp.fc1.weight",
                                   "model: 2 blocks"]),
    ({"name": "vit_small"}, InitShapeError, ["cls_token: file [1, 1, 384], model [1, 1, 192]",
                                             "file: 2 blocks, width 384, patch 8"]),
    ({"patch_size": 16}, InitShapeError, ["patch_embed.proj.weight: file [192, 3, 16, 16], model [192, 3, 8, 8]"]),
])
def test_a_wrong_architecture_fails_naming_the_keys_or_shapes(tmp_path, args, error, expected):
    path = save_weights(tmp_path / "w.safetensors", source_backbone(**args).state_dict())
    with pytest.raises(error) as info:
        Trainer(config(tmp_path, f"model.init_from={path}"), steps_per_epoch=5)
    message = str(info.value)
    assert all(text in message for text in expected), message
    assert str(path) in message


def test_cli_reports_a_wrong_architecture_and_a_missing_file(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", "train", 1)
    path = save_weights(tmp_path / "w.pth", source_backbone(depth=3).state_dict())
    args = ["train", "--out", str(tmp_path / "run"), *TINY_OVERRIDES, f"data.train={data}", "data.val=null"]
    assert main([*args, f"model.init_from={path}"]) == 2
    err = capsys.readouterr().err
    assert "dinovmf train: error: model.init_from" in err and "blocks.2.attn.qkv.weight" in err
    assert main([*args, f"model.init_from={tmp_path / 'nowhere.pt'}"]) == 2
    assert f"{tmp_path / 'nowhere.pt'}' does not exist" in capsys.readouterr().err


def test_lenient_loading_accepts_only_the_named_differences(tmp_path, capsys):
    """Registers the file lacks (kept fresh) and a layer-scale tensor we lack (dropped), named in
    model.init_ignore; anything not named still fails, and so does leniency without names."""
    weights = source_backbone().state_dict() | {"blocks.0.ls1.gamma": torch.ones(192)}
    path = save_weights(tmp_path / "w.safetensors", weights)
    base = [f"model.init_from={path}", "model.num_register_tokens=2"]
    with pytest.raises(InitKeysError) as info:
        Trainer(config(tmp_path, *base), steps_per_epoch=5)
    assert (info.value.missing, info.value.unexpected) == (["reg_token"], ["blocks.0.ls1.gamma"])
    with pytest.raises(InitKeysError, match=r"unexpected in the file \(1\): blocks.0.ls1.gamma") as info:
        Trainer(config(tmp_path, *base, "model.init_strict=false", "model.init_ignore=[reg_token]"),
                steps_per_epoch=5)
    assert info.value.missing == []

    cfg = config(tmp_path, *base, "model.init_strict=false", "model.init_ignore=[reg_token, blocks.*.ls1.*]")
    capsys.readouterr()
    trainer = Trainer(cfg, steps_per_epoch=5)
    fresh = Trainer(config(tmp_path, "model.num_register_tokens=2"), steps_per_epoch=5).models.student.backbone
    backbone = trainer.models.student.backbone
    assert torch.equal(backbone.reg_token, fresh.reg_token)
    assert torch.equal(backbone.blocks[1].mlp.fc2.weight, weights["blocks.1.mlp.fc2.weight"])
    report = capsys.readouterr().out
    assert "kept fresh: reg_token" in report and "dropped (init_ignore): blocks.0.ls1.gamma" in report

    for extra, match in ((["model.init_strict=false"], "needs model.init_ignore"),
                         (["model.init_ignore=[reg_token]"], "needs model.init_strict=false")):
        with pytest.raises(ValueError, match=match):
            config(tmp_path, *base, *extra)
    with pytest.raises(ValueError, match="need model.init_from"):
        config(tmp_path, "model.init_strict=false", "model.init_ignore=[reg_token]")


def test_prototypes_stay_frozen_for_freeze_last_layer(tmp_path):
    """optim.freeze_last_layer = 0.4 epoch of 5 steps = 2 steps, as in any run: the fresh prototypes (v, g)
    are bitwise unchanged through steps 0-1 while the loaded backbone trains, and move at step 2."""
    path = save_weights(tmp_path / "w.safetensors", source_backbone().state_dict())
    cfg = config(tmp_path, "optim.clip_grad=0", f"model.init_from={path}")
    check_prototypes_frozen_then_train(Trainer(cfg, steps_per_epoch=5), cfg)


def test_resume_takes_precedence_over_init_from(tmp_path, capsys):
    """Resuming restores the run's own checkpoint; model.init_from is not read again (here it is gone)."""
    weights = save_weights(tmp_path / "w.safetensors", source_backbone().state_dict())
    cfg = config(tmp_path, f"model.init_from={weights}")
    trainer = Trainer(cfg, tmp_path / "run", steps_per_epoch=5)
    trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 0)
    path = trainer.save()
    weights.unlink()
    capsys.readouterr()

    resumed = Trainer.resume(path, out_dir=tmp_path / "run")
    assert torch.equal(features(resumed.models.student.backbone), features(trainer.models.student.backbone))
    assert torch.equal(features(resumed.models.teacher.backbone), features(trainer.models.teacher.backbone))
    assert f"model.init_from={weights} not loaded: resuming from {path}" in capsys.readouterr().out
