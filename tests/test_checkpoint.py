"""Atomic checkpoint writes, pruning, resume resolution and RNG round trips."""
import os
import random

import numpy as np
import pytest
import torch

from dinovmf import checkpoint as ckpt


def test_save_prune_and_latest(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, keep_last=2)
    steps = [s for s, _ in ckpt.list_checkpoints(ckpt.checkpoint_dir(tmp_path))]
    assert steps == [15, 20]
    latest = ckpt.resolve_resume("auto", tmp_path)
    assert latest.name == "step_0000020.pt"
    assert torch.equal(ckpt.load_checkpoint(latest)["w"], torch.full((3,), 20.0))
    assert not [n for n in os.listdir(ckpt.checkpoint_dir(tmp_path)) if n.endswith(".tmp")]


def test_interrupted_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"step": 1, "w": torch.zeros(2)}, tmp_path, keep_last=3)

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. SIGINT in the middle of torch.save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2, "w": torch.ones(2)}, tmp_path, keep_last=3)
    monkeypatch.undo()
    names = os.listdir(ckpt.checkpoint_dir(tmp_path))
    assert names == ["step_0000001.pt"]  # no truncated step_2, no temp file
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_0000001.pt"


def test_resume_errors(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None
    assert ckpt.resolve_resume(None, tmp_path) is None
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.resolve_resume(tmp_path / "missing.pt", tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        ckpt.load_checkpoint(junk)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dinovmf training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
