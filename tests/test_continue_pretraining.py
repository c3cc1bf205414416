"""Continued pretraining: `optim.freeze_backbone_steps` (the backbone and its EMA copy fixed while the fresh head
learns, then a backbone lr warm-up) and `optim.layer_decay` (DINOv2 / DINOv3's layer-wise lr decay)."""
import pytest
import torch
from _train_utils import tiny_config

from dinovmf.config import load_config
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.models import export_teacher_backbone
from dinovmf.optim import param_groups
from dinovmf.schedules import build_schedules
from dinovmf.trainer import Trainer


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A trained tiny backbone to continue from (one step of the tiny run, exported)."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = tiny_config(tmp / "unused", None, ["steps=10"])
    trainer = Trainer(cfg, tmp / "run", steps_per_epoch=5)
    trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 0)
    return export_teacher_backbone(trainer.save(), tmp / "teacher.safetensors")


def continued(tmp_path, export, *extra):
    cfg = tiny_config(tmp_path / "unused", None, ["steps=10", "optim.warmup_epochs=0.4", f"model.init_from={export}",
                                                  "train.seed=1", *extra])
    return cfg, Trainer(cfg, steps_per_epoch=5)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_backbone_and_its_ema_copy_stay_fixed_while_the_head_learns(tmp_path, export):
    cfg, trainer = continued(tmp_path, export, "optim.freeze_backbone_steps=2", "optim.freeze_last_layer=0")
    student, teacher = trainer.models.student, trainer.models.teacher
    backbone0, head0, teacher_head0 = snapshot(student.backbone), snapshot(student.head), snapshot(teacher.head)
    for step in range(2):
        metrics = trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=step), step)
        for net in (student, teacher):
            for key, value in net.backbone.state_dict().items():
                assert torch.equal(value, backbone0[key]), f"{key} moved at step {step}"
    assert float(metrics["grad_norm"]) > 0  # the head's gradient alone was clipped, and it learned
    assert not torch.equal(student.head.v, head0["v"]) and not torch.equal(teacher.head.v, teacher_head0["v"])
    assert trainer.schedules.at(2)["backbone_lr_scale"] == pytest.approx(1 / 2)  # warm-up over 2 steps (0.4 epoch)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["decay/head"] > 0 and lrs["decay/backbone.layer1"] == 0.0  # step 1: frozen, lr scale 0
    trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=2), 2)
    moved = [k for k, v in student.backbone.state_dict().items() if not torch.equal(v, backbone0[k])]
    assert "blocks.0.attn.qkv.weight" in moved and "pos_embed" in moved
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["decay/backbone.layer1"] == pytest.approx(lrs["decay/head"] / 2)


def test_backbone_lr_warms_up_again_after_the_freeze():
    cfg = load_config(None, ["optim.freeze_backbone_steps=10", "optim.warmup_epochs=2", "model.init_from=w.pth",
                             "steps=100"])
    sched = build_schedules(cfg, steps_per_epoch=4)  # warm-up: 8 steps
    scales = [sched.at(s)["backbone_lr_scale"] for s in range(22)]
    assert scales[:10] == [0.0] * 10 and all(sched.at(s)["freeze_backbone"] for s in range(10))
    assert scales[10:18] == pytest.approx([(i + 1) / 8 for i in range(8)]) and scales[18:] == [1.0] * 4
    plain = build_schedules(load_config(None, ["steps=100"]), steps_per_epoch=4)
    assert {plain.at(s)["backbone_lr_scale"] for s in range(100)} == {1.0}
    assert not any(plain.at(s)["freeze_backbone"] for s in range(100))


def test_layer_decay_gives_each_layer_dinov2s_lr_multiplier(tmp_path, export):
    cfg, trainer = continued(tmp_path, export, "optim.layer_decay=0.5")
    names = {id(p): n for n, p in trainer.models.student.named_parameters()}
    mult = {names[id(p)]: g["lr_mult"] for g in trainer.optimizer.param_groups for p in g["params"]}
    depth = 2  # DINOv2 / DINOv3 get_vit_lr_decay_rate: decay ** (depth + 1 - layer), embeddings at layer 0
    for name, expected in {"backbone.patch_embed.proj.weight": 0.5 ** 3, "backbone.pos_embed": 0.5 ** 3,
                           "backbone.cls_token": 0.5 ** 3, "backbone.blocks.0.attn.qkv.weight": 0.5 ** 2,
                           "backbone.blocks.1.mlp.fc2.bias": 0.5 ** 1, "backbone.norm.weight": 1.0,
                           "head.mlp.0.weight": 1.0, "head.v": 1.0}.items():
        assert mult[name] == expected, name
    assert len(mult) == len([p for p in trainer.models.student.parameters() if p.requires_grad])
    trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 0)
    lr = trainer.schedules.at(0)["lr"]
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(lr * group["lr_mult"])
        assert group["weight_decay"] == (0.0 if group["name"].startswith("no_decay") else trainer.schedules.at(0)["wd"])
    plain = param_groups(trainer.models.student)  # off: DINO's two groups, as before
    assert [g["name"] for g in plain] == ["decay", "no_decay"] and depth == len(trainer.models.student.backbone.blocks)


@pytest.mark.parametrize("overrides, message", [
    (["optim.freeze_backbone_steps=5"], "optim.freeze_backbone_steps needs model.init_from"),
    (["optim.freeze_backbone_steps=-1"], "optim.freeze_backbone_steps must be >= 0"),
    (["optim.layer_decay=0"], r"optim.layer_decay must be in \(0, 1\]"),
    (["optim.layer_decay=1.2"], r"optim.layer_decay must be in \(0, 1\]"),
])
def test_bad_continue_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_the_continue_preset_turns_both_on():
    cfg = load_config("continue", ["model.init_from=w.pth"])
    assert cfg.optim.freeze_backbone_steps > 0 and cfg.optim.layer_decay == 0.9
    assert cfg.backbone.patch_size == 14 and cfg.crops.local_size % 14 == 0


def test_a_continued_run_resumes_exactly_across_the_end_of_the_freeze(tmp_path, export):
    """Checkpointed inside the freeze (the backbone has no AdamW state yet) and resumed: the per-layer groups,
    the lr scale and the moments come back, and the weights match a straight run bitwise after it ends."""
    extra = ["optim.freeze_backbone_steps=2", "optim.layer_decay=0.5"]
    cfg, straight = continued(tmp_path, export, *extra)
    for step in range(3):
        straight.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=step), step)
    _, stopped = continued(tmp_path, export, *extra)
    stopped.out_dir = tmp_path / "stopped"
    stopped.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=0), 0)
    resumed = Trainer.resume(stopped.save(), cfg, tmp_path / "stopped")
    for step in (1, 2):
        resumed.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=step), step)
    assert [g["name"] for g in resumed.optimizer.param_groups] == [g["name"] for g in straight.optimizer.param_groups]
    for key, value in straight.models.student.state_dict().items():
        assert torch.equal(resumed.models.student.state_dict()[key], value), key
