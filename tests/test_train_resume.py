"""A run stopped at step 2 and resumed follows the uninterrupted run's loss trajectory step for step.

Step 2 is mid-epoch (3 steps per epoch), and drop-path is on, so this checks the data order (skipping
the trained batches of the epoch), the augmentation, the RNG state, optimizer and EMA state, and the
center all come back exactly.
"""
import pytest
import torch
from _train_utils import fit, read_records, signal_before_batch, tiny_config, write_image_folder

from dinovmf import checkpoint as ckpt
from dinovmf.cli import main
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.train import train
from dinovmf.trainer import Trainer

STEPS = 5  # crosses the epoch boundary at step 3


def test_resume_matches_uninterrupted_run(tmp_path, capsys):
    train_dir = write_image_folder(tmp_path / "train", "train", 3)  # 30 images: 3 steps per epoch
    cfg = tiny_config(train_dir, None, [f"steps={STEPS}"])

    straight = tmp_path / "straight"
    train(cfg, straight)

    # The same run, pre-empted after step 2 (SIGTERM), then continued by the CLI with --resume auto.
    resumed = tmp_path / "resumed"
    summary, _ = fit(cfg, resumed, signal_before_batch(1))
    assert summary["interrupted"] and summary["step"] == 2
    overrides = [f"data.train={train_dir}", "data.val=null"]
    assert main(["train", "--out", str(resumed), "--resume", "auto", *overrides]) == 0  # reuses config.yaml
    assert "resumed from step 2" in capsys.readouterr().out

    a, b = read_records(straight), read_records(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), f"step {ra['step']}"
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
    # The losses differ from step to step, so the comparison above can fail.
    assert len({round(r["loss"], 6) for r in a}) > 1

    end_a = ckpt.load_checkpoint(ckpt.latest_checkpoint(straight / "checkpoints"))
    end_b = ckpt.load_checkpoint(ckpt.latest_checkpoint(resumed / "checkpoints"))
    assert end_a["step"] == end_b["step"] == STEPS
    for net in ("student", "teacher"):
        for key, value in end_a[net].items():
            torch.testing.assert_close(end_b[net][key], value, rtol=1e-5, atol=1e-6, msg=f"{net}.{key}")
    for key, value in end_a["loss"].items():
        torch.testing.assert_close(end_b["loss"][key], value, rtol=1e-5, atol=1e-7)


def test_checkpoint_in_the_freeze_period_resumes_with_exact_adam_state(tmp_path):
    """AdamW holds no state for the frozen prototypes until they train; saving (even before the first step)
    and resuming must keep it that way, or their bias correction would be off by a step once they train."""
    cfg = tiny_config("unused", None, ["steps=10"])  # 5 steps per epoch: prototypes frozen for 2 steps
    straight = Trainer(cfg, tmp_path / "a", steps_per_epoch=5)
    straight.save()
    assert not straight.optimizer.state

    def crops(s):
        return synthetic_crops(cfg.crops, cfg.train.batch_size, seed=s)
    straight.train_step(crops(0), 0)
    path = straight.save()
    losses = [float(straight.train_step(crops(s), s)["loss"]) for s in range(1, 4)]

    resumed = Trainer.resume(path, out_dir=tmp_path / "b")
    for trainer in (straight, resumed):
        names = {p: n for n, p in trainer.models.student.named_parameters()}
        with_state = {names[p] for p in trainer.optimizer.state}
        assert "backbone.blocks.0.attn.qkv.weight" in with_state
    names = {p: n for n, p in resumed.models.student.named_parameters()}
    assert not {"head.v", "head.g"} & {names[p] for p in resumed.optimizer.state}
    assert [float(resumed.train_step(crops(s), s)["loss"]) for s in range(1, 4)] == losses
