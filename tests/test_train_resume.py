"""A run stopped at step 2 and resumed follows the uninterrupted run's loss trajectory step for step.

Step 2 is mid-epoch (3 steps per epoch), and drop-path is on, so this checks the data order (skipping
the trained batches of the epoch), the augmentation, the RNG state, optimizer and EMA state, and the
center all come back exactly.
"""
import os
import signal

import pytest
import torch
from _train_utils import read_records, tiny_config, write_image_folder

from dinovmf import checkpoint as ckpt
from dinovmf import train as train_mod
from dinovmf.cli import main
from dinovmf.train import train

STEPS = 5  # crosses the epoch boundary at step 3


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, capsys):
    train_dir = write_image_folder(tmp_path / "train", "train", 3)  # 30 images: 3 steps per epoch
    cfg = tiny_config(train_dir, None, [f"steps={STEPS}"])

    straight = tmp_path / "straight"
    train(cfg, straight)

    # The same run, pre-empted after step 2 (SIGTERM), then continued by the CLI with --resume auto.
    resumed = tmp_path / "resumed"
    real_step = train_mod._train_step

    def step_then_signal(cfg, step, *args):
        out = real_step(cfg, step, *args)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_mod, "_train_step", step_then_signal)
    assert train(cfg, resumed)["step"] == 2
    monkeypatch.setattr(train_mod, "_train_step", real_step)
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
