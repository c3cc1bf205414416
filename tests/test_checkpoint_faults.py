"""Checkpoint faults caused for real, each bounded in time: a save killed midway (SIGKILL), a disk that
fills on the second checkpoint (a small tmpfs), a truncated newest checkpoint under `--resume auto`, and
files whose unpickling would run code, through every loader a user names a file to."""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_utils import TINY_OVERRIDES, read_records, tiny_config, write_image_folder

from dinovmf import checkpoint as ckpt
from dinovmf.cli import main
from dinovmf.models import build_ssl_model, model_args
from dinovmf.trainer import Trainer

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("faults") / "train", "train", 4)  # 40 images


def cli_train(out: Path, data: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TINY_OVERRIDES, f"data.train={data}", "data.val=null", *extra])


# ------------------------------------------------------------------------------------ killed write

KILLED_WRITER = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
from _train_utils import tiny_config
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.trainer import Trainer

cfg = tiny_config("unused", None, ["steps=10", "train.ckpt_async=false"])
trainer = Trainer(cfg, sys.argv[1], steps_per_epoch=5)
trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=0), 0)
trainer.save()
trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=1), 1)
def stalled_fsync(fd):  # the shard's bytes are written, not yet synced: where a kill hurts most
    print("WRITING", flush=True)
    time.sleep(120)
os.fsync = stalled_fsync
trainer.save()
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_newest(tmp_path, capsys):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, seen = time.monotonic() + 240, ""
        while "WRITING" not in seen and time.monotonic() < deadline and child.poll() is None:
            if select.select([child.stdout], [], [], 1.0)[0]:
                seen += child.stdout.readline()
        assert "WRITING" in seen, seen[-3000:]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    directory = ckpt.checkpoint_dir(tmp_path / "run")
    partial = directory / ".step_0000002.tmp"
    assert partial.is_dir() and any(p.suffix == ".distcp" for p in partial.iterdir())  # it died mid-write
    assert ckpt.resolve_resume("auto", tmp_path / "run") == directory / "step_0000001"
    resumed = Trainer.resume(directory / "step_0000001", out_dir=tmp_path / "run")
    assert resumed.step == 1
    resumed.save()  # the next writer clears what the killed one left
    assert sorted(os.listdir(directory)) == ["step_0000001"]
    assert "removed" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1.6 checkpoints of the tiny config: the first checkpoint fits, the second does not."""
    cfg = tiny_config("unused")
    with torch.device("meta"):
        params = sum(p.numel() for p in build_ssl_model(cfg, 0.0).parameters())
    mount = tmp_path / "disk"
    mount.mkdir()
    size_kb = int(1.6 * 16 * params / 1024)  # student, teacher, AdamW's two moments, fp32
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full test needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], timeout=30)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_full_disk_is_one_line_and_the_first_checkpoint_stays_resumable(small_disk, data, capsys, asynchronous):
    run = small_disk / "run"  # step 1's checkpoint fits, the final one (step 2) does not
    code = cli_train(run, data, "steps=2", "train.ckpt_every=1", f"train.ckpt_async={str(asynchronous).lower()}")
    out, err = capsys.readouterr()
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out + err, err
    assert lines[0].startswith("dinovmf train: stopped: checkpoint of step 2 not written: no space left in "
                               f"{run / 'checkpoints'} (it needs about ")
    assert f"the newest intact checkpoint is {run / 'checkpoints' / 'step_0000001'}" in lines[0]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000001"]  # the partial write was removed
    assert Trainer.resume(ckpt.resolve_resume("auto", run)).step == 1


# ------------------------------------------------------------------------------ a corrupt newest one


def test_resume_auto_falls_back_past_a_truncated_newest_checkpoint(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert cli_train(run, data, "steps=2", "train.ckpt_every=1") == 0
    shard = run / "checkpoints" / "step_0000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "auto", f"data.train={data}", "data.val=null",
                 "steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"warning: --resume auto: skipping unreadable checkpoint {run / 'checkpoints' / 'step_0000002'}" in out
    assert "resumed from step 1" in out
    assert [r["step"] for r in read_records(run)][-2:] == [2, 3]  # train records (warnings may sit between)


# ---------------------------------------------------------------------------------- files run code


class Payload:
    """Unpickling this writes a marker file (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def payload_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """A version-1 checkpoint carrying the payload, and a checkpoint directory whose DCP metadata is it
    (with a manifest that matches, as an attacker would write one)."""
    import pickle

    cfg = tiny_config("unused")
    teacher = {f"backbone.{k}": v for k, v in build_ssl_model(cfg, 0.0).backbone.state_dict().items()}
    legacy = tmp_path / "evil.pt"
    torch.save({"step": 1, "config": cfg.to_dict(), "model_args": model_args(cfg), "teacher": teacher,
                "student": teacher, "payload": Payload(marker)}, legacy)
    directory = tmp_path / "evil" / "step_0000001"
    directory.mkdir(parents=True)
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (directory / "__0_0.distcp").write_bytes(b"")
    ckpt.write_json(directory / ckpt.TRAINER_STATE, {"format": ckpt.FORMAT, "version": 2, "step": 1,
                                                       "config": cfg.to_dict(), "model_args": model_args(cfg)})
    files = {p.name: ckpt.file_digest(p) for p in directory.iterdir()}
    ckpt.write_json(directory / ckpt.MANIFEST, {"format": ckpt.FORMAT, "version": 2, "step": 1, "files": files})
    return {"file": legacy, "directory": directory}


def test_no_loader_runs_a_checkpoints_pickled_code(tmp_path, data, capsys):
    marker = tmp_path / "marker"
    files = payload_files(tmp_path, marker)
    image = next(data.rglob("*.png"))
    for kind, path in files.items():
        opt_in = "--trust-pickle" if kind == "file" else "not loaded"
        commands = {
            "--resume": ["train", "--out", str(tmp_path / "run"), "--resume", str(path), f"data.train={data}",
                         "data.val=null", *TINY_OVERRIDES],
            "export": ["export", str(path), str(tmp_path / "out.safetensors")],
            "eval": ["eval", "knn", str(path), "--train", str(data), "--val", str(data), "--loader", "pil"],
            "attention": ["attention", str(path), str(image), "--out", str(tmp_path / "attn")],
            "model.init_from": ["train", "--out", str(tmp_path / "fresh"), f"data.train={data}", "data.val=null",
                                *TINY_OVERRIDES, f"model.init_from={path}"],
        }
        for loader, argv in commands.items():
            assert main(argv) == 2, (kind, loader)
            err = capsys.readouterr().err
            expected = "model.init_trust_pickle=true" if kind == "file" and loader == "model.init_from" else opt_in
            assert expected in err and "error" in err, (kind, loader, err)
            assert not marker.exists(), f"{loader} ran the {kind}'s pickled code"
    # The opt-in is what runs it: the user vouched for the file.
    assert main(["export", str(files["file"]), str(tmp_path / "out.safetensors"), "--trust-pickle"]) == 0
    assert marker.read_text() == "ran"
