"""Checkpoint directories: writing (sync and async), pruning, temporaries, verification, `--resume auto`'s
fallback, permissions, RNG states, and DDP's share of replicated tensors."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
from _train_utils import tiny_config

from dinovmf import checkpoint as ckpt
from dinovmf.checkpoint_writer import CheckpointWriter, this_ranks_share
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.trainer import Trainer


def tensors(step: int) -> dict:
    return {"student/w": torch.full((3, 4), float(step)), "loss/center": torch.arange(5.0) + step,
            "rng/0/torch": torch.get_rng_state()}


def trainer_state(step: int) -> dict:
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": step, "config": {}, "model_args": {}}


def write(out_dir, steps, keep_last=10, asynchronous=False) -> CheckpointWriter:
    writer = CheckpointWriter(out_dir, keep_last, asynchronous=asynchronous)
    for step in steps:
        writer.save(step, tensors(step), trainer_state(step))
    writer.close()
    return writer


def test_directories_are_written_listed_pruned_and_read_back(tmp_path):
    directory = ckpt.checkpoint_dir(tmp_path)
    directory.mkdir(parents=True)
    torch.save({"step": 1, "student": {"w": torch.zeros(2)}}, directory / "step_0000001.pt")  # version 1
    write(tmp_path, [2, 3, 4], keep_last=2)
    assert [(s, p.name) for s, p in ckpt.list_checkpoints(directory)] == [(3, "step_0000003"), (4, "step_0000004")]
    assert sorted(os.listdir(directory)) == ["step_0000003", "step_0000004"]  # nothing else left behind
    latest = ckpt.latest_checkpoint(directory)
    assert sorted(os.listdir(latest)) == [".metadata", "__0_0.distcp", "manifest.json", "trainer.json"]
    state = ckpt.load_checkpoint(latest)
    assert state["step"] == 4 and torch.equal(state["student"]["w"], torch.full((3, 4), 4.0))
    assert torch.equal(state["loss"]["center"], torch.arange(5.0) + 4)
    assert ckpt.checkpoint_bytes(latest) == sum(f.stat().st_size for f in latest.iterdir())


def test_a_second_save_of_a_step_replaces_it(tmp_path):
    writer = CheckpointWriter(tmp_path, 3, asynchronous=False)
    writer.save(5, tensors(5), trainer_state(5))
    writer.save(5, {**tensors(5), "student/w": torch.ones(3, 4)}, trainer_state(5))
    assert torch.equal(ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 5))["student"]["w"], torch.ones(3, 4))
    assert sorted(os.listdir(ckpt.checkpoint_dir(tmp_path))) == ["step_0000005"]


def test_what_interrupted_writes_left_is_removed_at_start(tmp_path, capsys):
    write(tmp_path, [1])
    directory = ckpt.checkpoint_dir(tmp_path)
    (directory / ".step_0000003.tmp").mkdir()  # a directory write killed midway
    (directory / ".step_0000003.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (directory / ".step_0000002.pt.x1y2.tmp").write_bytes(b"partial")  # version 1's temp file
    shutil.copytree(directory / "step_0000001", directory / ".step_0000004.replaced")  # killed between renames
    CheckpointWriter(tmp_path, 3, asynchronous=False)
    assert sorted(os.listdir(directory)) == ["step_0000001", "step_0000004"]
    assert "removed" in capsys.readouterr().out and ckpt.verify_checkpoint(directory / "step_0000004") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "metadata"])
def test_verification_names_what_is_wrong(tmp_path, damage):
    write(tmp_path, [1])
    path = ckpt.checkpoint_path(tmp_path, 1)
    shard = path / "__0_0.distcp"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        expected = "__0_0.distcp has"
    elif damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
        expected = "fails its checksum"
    elif damage == "manifest":
        (path / "manifest.json").unlink()
        expected = "manifest.json is missing"
    else:
        (path / ".metadata").unlink()
        expected = ".metadata is missing"
    with pytest.raises(ckpt.CheckpointUnreadable, match=expected):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ValueError, match="unreadable"):
        ckpt.load_checkpoint(path)


def test_resume_auto_skips_unreadable_newest_checkpoints(tmp_path):
    write(tmp_path, [1, 2])
    directory = ckpt.checkpoint_dir(tmp_path)
    newest = directory / "step_0000002" / "__0_0.distcp"
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated
    (directory / "step_0000003.pt").write_bytes(os.urandom(4096))  # random bytes, version-1 name
    warnings = []
    assert ckpt.resolve_resume("auto", tmp_path, warn=warnings.append) == directory / "step_0000001"
    assert len(warnings) == 2
    assert "step_0000003.pt" in warnings[0] and "not a readable torch file" in warnings[0]
    assert "step_0000002" in warnings[1] and "__0_0.distcp has" in warnings[1]
    with pytest.raises(ValueError, match="step_0000002.*unreadable"):
        ckpt.resolve_resume(directory / "step_0000002", tmp_path)
    shutil.rmtree(directory / "step_0000001")
    with pytest.raises(ValueError, match="none of the 2 checkpoint"):
        ckpt.resolve_resume("auto", tmp_path, warn=warnings.append)
    assert ckpt.resolve_resume("auto", tmp_path / "elsewhere") is None and ckpt.resolve_resume(None, tmp_path) is None
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.resolve_resume(tmp_path / "missing", tmp_path)


def test_files_and_directories_respect_the_umask(tmp_path):
    previous = os.umask(0o002)  # a group-shared project folder
    try:
        write(tmp_path, [1])
    finally:
        os.umask(previous)
    path = ckpt.checkpoint_path(tmp_path, 1)
    assert path.stat().st_mode & 0o777 == 0o775
    assert {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()} == dict.fromkeys(os.listdir(path), 0o664)


def test_rng_states_round_trip_through_tensors():
    random.seed(3)
    np.random.seed(4)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal()
    state = ckpt.rng_from_tensors(ckpt.rng_tensors())
    a = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(3))
    assert a[:4] == b[:4] and torch.equal(a[4], b[4])
    assert all(isinstance(t, torch.Tensor) for t in ckpt.rng_tensors().values())


def test_each_replicated_tensor_is_written_by_exactly_one_rank():
    state = {f"student/p{i}": torch.zeros(i + 1, 8) for i in range(9)}
    state["rng/1/torch"] = torch.zeros(3)
    shares = [this_ranks_share(state, r, 3) for r in range(3)]
    replicated = [k for k in state if not k.startswith("rng/")]
    assert sorted(k for s in shares for k in s if k in replicated) == sorted(replicated)  # once each
    sizes = [sum(v.numel() for k, v in s.items() if k in replicated) for s in shares]
    assert max(sizes) - min(sizes) <= 9 * 8  # balanced within the largest tensor
    assert all("rng/1/torch" in s for s in shares)  # per-rank entries stay with the rank that has them


def test_an_async_save_overlapping_training_steps_holds_the_step_it_was_asked_for(tmp_path, monkeypatch):
    """The write is held back until two more training steps have changed every weight in place: the
    checkpoint still holds the state of the step `save` was called at, as a synchronous save does."""
    import threading

    import torch.distributed.checkpoint as dcp

    cfg = tiny_config("unused", None, ["steps=10", "train.ckpt_async=true"])
    sync_cfg = tiny_config("unused", None, ["steps=10", "train.ckpt_async=false"])
    twins = [Trainer(c, tmp_path / name, steps_per_epoch=5) for c, name in ((cfg, "async"), (sync_cfg, "sync"))]
    for trainer in twins:
        torch.manual_seed(0)  # the same drop-path draws for both
        for step in range(3):
            trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=step), step)

    release, original = threading.Event(), dcp.save
    monkeypatch.setattr(dcp, "save", lambda *a, **k: (release.wait(60), original(*a, **k))[1])
    overlapped = twins[0]
    before = overlapped.models.student.head.v.detach().clone()
    path = overlapped.save()
    for step in range(3, 5):  # while the write waits
        overlapped.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=step), step)
    assert not torch.equal(overlapped.models.student.head.v, before)  # the weights moved under the save
    release.set()
    overlapped.checkpoints.wait()
    monkeypatch.undo()
    sync_path = twins[1].save()

    a, b = ckpt.load_checkpoint(path), ckpt.load_checkpoint(sync_path)
    assert a["step"] == b["step"] == 3 and a["position"] == b["position"]
    for part in ("student", "teacher", "loss"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for name, fields in b["optimizer"]["state"].items():
        for field, value in fields.items():
            assert torch.equal(a["optimizer"]["state"][name][field], value), f"optimizer.{name}.{field}"
    assert torch.equal(a["student"]["head.v"], before)


def test_checkpoint_config_keys_are_validated():
    from dinovmf.config import load_config

    assert load_config(None, ["train.ckpt_async=true"]).train.ckpt_async is True
    assert load_config(None).train.ckpt_async is None  # on for multi-process runs, off for one process
    with pytest.raises(ValueError, match="train.ckpt_async expects true/false"):
        load_config(None, ["train.ckpt_async=sometimes"])
    with pytest.raises(ValueError, match="model.init_trust_pickle need"):
        load_config(None, ["model.init_trust_pickle=true"])  # nothing to trust without model.init_from
