"""A few steps of `method=ibot_vmf` through the real training loop (tiny config, CPU)."""
import math
import shutil

import pytest
import torch
from _train_utils import read_records, tiny_config, tiny_data

from dinovmf import checkpoint as ckpt
from dinovmf.config import load_config
from dinovmf.models import build_ssl_model
from dinovmf.train import train

# No warm-up and no frozen prototypes, so that every parameter moves from the first step on.
IBOT = ["method=ibot_vmf", "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "ibot.mask_probability=1.0",
        "ibot.mask_min_ratio=0.2", "ibot.mask_max_ratio=0.3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("tiny_ibot"))


def test_ibot_vmf_shared_head_trains_masked_patches_and_resumes_exactly(data, tmp_path):
    cfg = tiny_config(data[0], None, IBOT + ["steps=3", "train.ckpt_every=2", "ibot.shared_head=true"])
    train(cfg, tmp_path / "straight")

    records = read_records(tmp_path / "straight")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["loss_ibot_patch"]) and math.isfinite(r["loss_dino"])
        # loss = the sum of the weighted terms (patch weight 1 by default)
        assert r["loss"] == pytest.approx(r["loss_dino"] + r["loss_ibot_patch"], rel=1e-5)
        # Every image is masked (probability 1) at 20-30% of its 16 patches: 3 or 4 patches.
        assert r["masked_images"] == 2 * 8 and 0.15 <= r["mask_ratio"] <= 0.3
        assert r["loss_ibot_patch"] > 0 and r["patch_used_prototypes"] >= 1
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    # Two centers, CLS and patch, both moved from prob centering's uniform start.
    centers = {k: v for k, v in state["loss"].items() if k.endswith("center")}
    assert len(centers) == 2
    for center in centers.values():
        assert center.shape == (64,) and not torch.allclose(center, torch.full((64,), 1 / 64))
    assert not any(k.startswith("patch_head.") for k in state["student"])  # shared: no second head
    # The mask token is trained (it only ever sees gradient through masked patches).
    torch.manual_seed(cfg.train.seed)
    init = build_ssl_model(cfg, 0.0).state_dict()
    assert not torch.equal(state["student"]["backbone.mask_token"], init["backbone.mask_token"])

    # Resumed from the step-2 checkpoint, step 3 draws the same masks (the CPU RNG is checkpointed) and
    # uses the same patch center: the same losses, exactly.
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_0000002",
                    tmp_path / "resumed" / "checkpoints" / "step_0000002")
    train(cfg, tmp_path / "resumed", resume="auto")
    resumed = read_records(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3]
    for key in ("loss", "loss_dino", "loss_ibot_patch", "masked_tokens"):
        assert resumed[0][key] == records[2][key], key


def test_ibot_vmf_separate_patch_head_has_its_own_prototypes(data, tmp_path):
    cfg = tiny_config(data[0], None, IBOT + ["steps=1", "ibot.shared_head=false", "ibot.patch_out_dim=48"])
    train(cfg, tmp_path)

    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert state["student"]["patch_head.v"].shape == (48, 32)
    assert state["teacher"]["patch_head.v"].shape == (48, 32)
    torch.manual_seed(cfg.train.seed)
    init = build_ssl_model(cfg, 0.0).state_dict()
    # The patch loss reaches the patch head, and its free norms train (vMF).
    assert not torch.equal(state["student"]["patch_head.v"], init["patch_head.v"])
    assert not torch.equal(state["student"]["patch_head.g"], init["patch_head.g"])
    records = read_records(tmp_path)
    assert all(math.isfinite(r["loss_ibot_patch"]) and r["patch_used_prototypes"] <= 48 for r in records)
    assert "patch_unique_prototypes" in records[-1]


def test_ibot_config_is_validated():
    with pytest.raises(ValueError, match="ibot.mask_max_ratio"):
        load_config(None, ["method=ibot_vmf", "ibot.mask_min_ratio=0.4", "ibot.mask_max_ratio=0.3"])
    with pytest.raises(ValueError, match="ibot.mask_probability"):
        load_config(None, ["method=ibot_vmf", "ibot.mask_probability=2"])
    with pytest.raises(ValueError, match="crops.global_size"):
        load_config(None, ["method=ibot_vmf", "crops.global_size=36", "model.patch_size=8"])
    with pytest.raises(ValueError, match="ibot.patch_out_dim"):
        load_config(None, ["method=ibot_vmf", "ibot.patch_out_dim=0"])
