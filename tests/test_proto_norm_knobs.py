"""The prototype-norm knobs: model.proto_norm_init_spread (log-normal initial norms g) and
optim.proto_norm_lr_mult (the lr of g), their validation, and checkpoint / resume with them."""
import math

import pytest
import torch
from _train_utils import tiny_config, write_image_folder

from dinovmf import checkpoint as ckpt
from dinovmf.config import load_config
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.models import DINOHead, build_ssl_model, init_student
from dinovmf.optim import param_groups
from dinovmf.train import train
from dinovmf.trainer import Trainer

KNOBS = ["model.proto_norm_init_spread=0.5", "optim.proto_norm_lr_mult=10"]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("knobs") / "train", "train", 3)  # 3 steps per epoch


def test_init_spread_draws_log_normal_norms_around_one(tmp_path):
    sigma, k = 0.4, 8192
    cfg = tiny_config(tmp_path, None, [f"model.proto_norm_init_spread={sigma}", f"model.out_dim={k}"])
    g = init_student(cfg).head.g.detach()
    log_g = g.double().log()
    # Sample mean and std of K normal draws: standard errors sigma / sqrt(K) and sigma / sqrt(2K).
    assert abs(log_g.mean().item()) < 4 * sigma / math.sqrt(k)
    assert abs(log_g.std().item() - sigma) < 4 * sigma / math.sqrt(2 * k)
    assert abs(log_g.median().item()) < 0.02  # median norm 1

    again = init_student(cfg).head.g.detach()
    other_seed = init_student(tiny_config(tmp_path, None, [f"model.proto_norm_init_spread={sigma}",
                                                            f"model.out_dim={k}", "train.seed=1"])).head.g.detach()
    assert torch.equal(again, g) and not torch.allclose(again, other_seed)


def test_init_spread_changes_only_the_norms(tmp_path):
    unit = init_student(tiny_config(tmp_path, None, ["model.proto_norm_init_spread=0"])).state_dict()
    spread = init_student(tiny_config(tmp_path, None, ["model.proto_norm_init_spread=0.25"])).state_dict()
    assert torch.equal(unit["head.g"], torch.ones_like(unit["head.g"]))  # sigma 0: today's init
    assert not torch.equal(spread["head.g"], unit["head.g"])
    assert all(torch.equal(spread[k], v) for k, v in unit.items() if k != "head.g")


def test_separate_ibot_patch_head_norms_are_spread_too(tmp_path):
    cfg = tiny_config(tmp_path, None, ["method=ibot_vmf", "ibot.shared_head=false",
                                       "model.proto_norm_init_spread=0.5"])
    model = init_student(cfg)
    assert model.head.g.std() > 0.1 and model.patch_head.g.std() > 0.1
    assert not torch.equal(model.head.g, model.patch_head.g)


@pytest.mark.parametrize("override, message", [
    ("model.proto_norm_init_spread=-0.1", "model.proto_norm_init_spread must be a finite sigma >= 0"),
    ("model.proto_norm_init_spread=.nan", "model.proto_norm_init_spread must be a finite sigma >= 0"),
    ("optim.proto_norm_lr_mult=-1", "optim.proto_norm_lr_mult must be finite and >= 0"),
    ("optim.proto_norm_lr_mult=.inf", "optim.proto_norm_lr_mult must be finite and >= 0"),
    ("model.proto_norm_init_spread=abc", "model.proto_norm_init_spread expects a number"),
])
def test_bad_knob_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("demo", [override])


@pytest.mark.parametrize("knob", KNOBS)
def test_knobs_are_refused_with_unit_norms(knob):
    # method=dino fixes g at 1 (norm_last_layer): the knob would be silently ignored, so it is an error.
    with pytest.raises(ValueError, match=rf"{knob.split('=')[0]}=.* needs free prototype norms.*"
                                         "model.norm_last_layer=false"):
        load_config("demo", ["method=dino", knob])
    cfg = load_config("demo", ["method=dino", "model.norm_last_layer=false", knob])  # free norms: accepted
    assert not cfg.norm_last_layer and not cfg.vmf


def test_head_spread_needs_free_norms_and_a_valid_sigma():
    unit, free = DINOHead(8, out_dim=16, hidden_dim=8, bottleneck_dim=4), \
        DINOHead(8, out_dim=16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    unit.spread_norms_(0.0)  # sigma 0 asks for nothing
    with pytest.raises(ValueError, match="norm_last_layer=False"):
        unit.spread_norms_(0.5)
    for bad in (-1.0, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
            free.spread_norms_(bad)


def test_lr_multiplier_group_holds_only_the_trainable_norms(tmp_path):
    model = build_ssl_model(tiny_config(tmp_path, None, ["method=ibot_vmf", "ibot.shared_head=false"]), 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["name"] for g in param_groups(model)] == ["decay", "no_decay"]  # mult 1: today's two groups
    groups = {g["name"]: g for g in param_groups(model, 10.0)}
    assert {names[id(p)] for p in groups["proto_norm"]["params"]} == {"head.g", "patch_head.g"}
    assert groups["proto_norm"]["lr_mult"] == 10.0 and groups["proto_norm"]["weight_decay"] == 0.0
    assert not {"head.g", "patch_head.g"} & {names[id(p)] for p in groups["no_decay"]["params"]}
    unit = build_ssl_model(tiny_config(tmp_path, None, ["method=dino"]), 0.0)  # g frozen: no third group
    assert [g["name"] for g in param_groups(unit, 10.0)] == ["decay", "no_decay"]


def test_lr_multiplier_scales_the_scheduled_lr_every_step(tmp_path):
    cfg = tiny_config(tmp_path, None, ["optim.proto_norm_lr_mult=10"])
    trainer = Trainer(cfg, steps_per_epoch=5)
    crops = synthetic_crops(cfg.crops, cfg.train.batch_size)
    seen = []
    for step in range(4):
        trainer.train_step(crops, step)
        seen.append((trainer.schedules.at(step)["lr"], {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}))
    assert len({lr for lr, _ in seen}) > 1  # the warm-up moves the lr
    for scheduled, lrs in seen:
        assert lrs["decay"] == lrs["no_decay"] == scheduled
        assert lrs["proto_norm"] == pytest.approx(10 * scheduled, rel=1e-12)


def test_resume_with_spread_norms_and_lr_multiplier_matches_a_straight_run(train_dir, tmp_path):
    cfg = tiny_config(train_dir, None, ["steps=5", *KNOBS])
    train(cfg, tmp_path / "straight")
    # The same run stopped by a (tiny) time limit after its first step, then resumed from that checkpoint.
    stopped = tiny_config(train_dir, None, ["steps=5", *KNOBS, "train.time_limit_min=1e-9"])
    assert train(stopped, tmp_path / "resumed")["step"] == 1
    assert train(cfg, tmp_path / "resumed", resume="auto")["step"] == 5

    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / d / "checkpoints")) for d in ("straight", "resumed"))
    assert [g["lr_mult"] for g in b["optimizer"]["param_groups"] if g["name"] == "proto_norm"] == [10.0]
    for net in ("student", "teacher"):
        torch.testing.assert_close(b[net]["head.g"], a[net]["head.g"], rtol=1e-5, atol=1e-6)
    # The norms were spread and they trained: the comparison above could fail.
    start = init_student(cfg).head.g.detach()
    assert start.std() > 0.2 and not torch.allclose(a["student"]["head.g"], start)


def test_trained_norms_start_from_init_student(train_dir, tmp_path):
    # One step with the last layer frozen: the teacher's norms are still the trainer's initial norms,
    # which the study reconstructs with init_student.
    cfg = tiny_config(train_dir, None, ["steps=1", "optim.freeze_last_layer=1", *KNOBS])
    train(cfg, tmp_path)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert torch.equal(state["teacher"]["head.g"], init_student(cfg).head.g.detach())
