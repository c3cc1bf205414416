"""A run stopped at step 2 and resumed follows the uninterrupted run's loss trajectory step for step, from
a checkpoint directory and from a single-file checkpoint of earlier versions.

Step 2 is mid-epoch (3 steps per epoch), and drop-path is on, so this checks the data order (the epoch
read on from its first untrained sample), the augmentation, the RNG state, optimizer and EMA state, and
the center all come back exactly.
"""
import pytest
import torch
from _train_utils import fit, read_records, signal_before_batch, tiny_config, write_image_folder

from bench.bench_checkpoint import full_gather_save
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

    # Its step-2 checkpoint again, in the single-file format of earlier versions (written as they wrote it),
    # resumed by the CLI into a third run.
    state_at_2 = Trainer.resume(ckpt.checkpoint_path(resumed, 2))
    legacy = full_gather_save(state_at_2, tmp_path / "old" / "step_0000002.pt")
    assert main(["train", "--config", str(resumed / "config.yaml"), "--out", str(tmp_path / "from_old"),
                 "--resume", str(legacy), *overrides]) == 0
    assert f"resumed from step 2 ({legacy})" in capsys.readouterr().out

    a, b = read_records(straight), read_records(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), f"step {ra['step']}"
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
    from_old = read_records(tmp_path / "from_old")
    assert [r["step"] for r in from_old] == list(range(3, STEPS + 1))
    for ra, rc in zip(a[2:], from_old):
        assert rc["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), f"step {ra['step']} (single file)"
    # The losses differ from step to step, so the comparisons above can fail.
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
