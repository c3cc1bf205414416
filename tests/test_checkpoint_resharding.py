"""Sharded checkpoints across world sizes: a 1-process run, a 2-rank DDP run and a 2-rank FSDP2 run, each
resumed on 1 process and on 2 ranks (one torchrun launch holds every 2-rank run).

Same world size: the per-step losses of the resumed run are those of the uninterrupted one. Another world
size trains other batches (a rank's crops depend on its batch), so there the test asserts what must carry
over: the exact state (weights, AdamW moments, centers), the schedules (the lr per 256 images, the weight
decay, the EMA momentum and the teacher temperature continue at the same sample position) and the data
(the rest of the interrupted epoch, each remaining image once: every image here has its own label).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_utils import HookedLoader, read_records, tiny_config

from dinovmf import checkpoint as ckpt
from dinovmf.distributed import DistInfo
from dinovmf.train import build_train_loader
from dinovmf.trainer import Trainer

TESTS = Path(__file__).resolve().parent
IMAGES, BATCH = 40, 8  # one process: 5 steps per epoch; 2 ranks: 2 steps per epoch of 32 images
OVERRIDES = ["steps=6", "train.ckpt_every=1", "train.keep_last=10"]
RUNS = {"ddp": ["dist.fsdp=false"], "fsdp": ["dist.fsdp=true"], "single": ["dist.fsdp=false"]}
RESUMES = {"ddp_resumed": ("ddp", 3), "fsdp_resumed": ("fsdp", 3), "single_on2": ("single", 2)}  # 2 ranks
LAUNCH_TIMEOUT_S = 600

WORKER = f"""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, {str(TESTS)!r})
from test_checkpoint_resharding import fit_recording, RESUMES
from dinovmf.distributed import cleanup, init_distributed

out, data = Path(sys.argv[1]), sys.argv[2]
info = init_distributed("gloo")
for name in sys.argv[3:]:
    fit_recording(out, data, name, info, RESUMES.get(name))
cleanup()  # every process group destroyed before the interpreter exits (gloo aborts at exit otherwise)
"""


def write_unique_images(root: Path, count: int) -> Path:
    """`count` images, each in a class folder of its own: an image's label says which image it is."""
    from PIL import Image

    from dinovmf.data.embedded import render_image

    for i in range(count):
        (root / f"c{i:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_image("train", i, 32)[0]).save(root / f"c{i:02d}" / "x.png")
    return root


def config(data, name: str):
    return tiny_config(data, None, OVERRIDES + RUNS[name.split("_")[0]])


def fit_recording(out: Path, data, name: str, info: DistInfo, source=None) -> Trainer:
    """Train run `name` (from checkpoint step `source[1]` of run `source[0]` when given) on this process's
    loader, recording each rank's labels per step (labels_rank<r>.json) and, when resumed, the state right
    after the restore (state_rank0.pt)."""
    cfg = config(data, source[0] if source else name)
    loader = build_train_loader(cfg, out / name, info)
    labels = []
    recorded = RecordingLoader(loader, labels)
    if source is None:
        trainer = Trainer(cfg, out / name, steps_per_epoch=len(loader))
    else:
        path = ckpt.checkpoint_path(out / source[0], source[1])
        trainer = Trainer.resume(path, cfg, out / name, steps_per_epoch=len(loader))
        dump_state(trainer, out / name / "state_rank0.pt")
    start = trainer.step
    trainer.fit(recorded)
    (out / name / f"labels_rank{info.rank}.json").write_text(json.dumps(labels[: trainer.step - start]))
    return trainer


class RecordingLoader(HookedLoader):
    """Records the labels of every batch served (an image's label names it here)."""

    def __init__(self, loader, labels: list):
        super().__init__(loader, lambda i, crops: crops)
        self.labels = labels

    def __iter__(self):
        for crops, labels in self.loader:
            self.labels.append(labels.tolist())
            yield crops, labels


def dump_state(trainer: Trainer, path: Path) -> None:
    """Rank 0: the full student, teacher, AdamW state (by parameter name) and centers of `trainer`."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    models = trainer.models
    state = {"student": get_model_state_dict(models.student, options=full),
             "teacher": get_model_state_dict(models.teacher, options=full),
             "optimizer": get_optimizer_state_dict(models.student, trainer.optimizer, options=full).get("state"),
             "loss": trainer.objective.state_dict()}
    if trainer.info.is_main:  # the full state dicts are gathered onto rank 0 only
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process run, then one 2-rank launch: the DDP and FSDP2 runs, each resumed on 2 ranks from its
    step 3 (mid-epoch), and the 1-process run resumed on 2 ranks from its step 2 (mid-epoch)."""
    base = tmp_path_factory.mktemp("reshard")
    data = write_unique_images(base / "data", IMAGES)
    out = base / "runs"
    fit_recording(out, data, "single", DistInfo())
    worker = base / "worker.py"
    worker.write_text(WORKER)
    from test_distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(worker), str(out), str(data),
           "ddp", "fsdp", "ddp_resumed", "fsdp_resumed", "single_on2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return out, data, done.stdout


def labels(out: Path, name: str) -> list[list[list[int]]]:
    """[step][rank] -> the labels that rank trained on at that step of run `name`."""
    ranks = sorted(out.joinpath(name).glob("labels_rank*.json"))
    per_rank = [json.loads(p.read_text()) for p in ranks]
    return [list(step) for step in zip(*per_rank)]


def trained(out: Path, name: str, steps: range) -> list[int]:
    return [x for step in steps for rank in labels(out, name)[step] for x in rank]


def test_same_world_size_resumes_repeat_the_uninterrupted_losses(runs):
    out, _, _ = runs
    for name, (source, step) in (("ddp_resumed", RESUMES["ddp_resumed"]), ("fsdp_resumed", RESUMES["fsdp_resumed"])):
        straight, resumed = read_records(out / source), read_records(out / name)
        assert [r["step"] for r in resumed] == list(range(step + 1, 7))
        for a, b in zip(straight[step:], resumed):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), f"{name} step {a['step']}"
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert labels(out, name) == labels(out, source)[step:]
    assert len({round(r["loss"], 6) for r in read_records(out / "ddp")}) > 1  # the losses move


def assert_state_equals_checkpoint(state: dict, path: Path) -> None:
    saved = ckpt.load_checkpoint(path)
    for part in ("student", "teacher", "loss"):
        assert state[part].keys() == saved[part].keys(), part
        for key, value in saved[part].items():
            assert torch.equal(state[part][key], value), f"{part}.{key}"
    assert state["optimizer"].keys() == saved["optimizer"]["state"].keys()
    for name, fields in saved["optimizer"]["state"].items():
        for field, value in fields.items():
            assert torch.equal(torch.as_tensor(state["optimizer"][name][field]), value), f"optimizer.{name}.{field}"


def resume_on_one_process(out: Path, data, source: str, step: int, capsys) -> Trainer:
    """Run `source` continued from its step `step` in this process; asserts the state it resumed with."""
    name = f"{source}_on1"
    cfg = config(data, source)
    loader = build_train_loader(cfg, out / name, DistInfo())
    path = ckpt.checkpoint_path(out / source, step)
    trainer = Trainer.resume(path, cfg, out / name, steps_per_epoch=len(loader))
    dump_state(trainer, out / name / "state_rank0.pt")
    assert_state_equals_checkpoint(torch.load(out / name / "state_rank0.pt"), path)
    printed = capsys.readouterr().out
    assert ("by 2 process(es) (global batch 16, 2 steps/epoch), this run has 1 (global batch 8, 5 steps/epoch)"
            in printed)
    labels_seen = []
    trainer.fit(RecordingLoader(loader, labels_seen))
    (out / name / "labels_rank0.json").write_text(json.dumps(labels_seen[: trainer.step - step]))
    return trainer


def assert_schedules_continue(straight: list[dict], resumed: list[dict], scale: float, start: int) -> None:
    """The resumed run's step s sits at position start + (s - start) * scale of the straight run's
    schedules: where that is a whole step the straight run logged, its values match (lr per image)."""
    by_step = {r["step"] - 1: r for r in straight}  # records name the step just done; values are its start's
    compared = 0
    for r in resumed:
        position = start + (r["step"] - 1 - start) * scale
        if position.is_integer() and int(position) in by_step:
            a = by_step[int(position)]
            assert r["lr"] / scale == pytest.approx(a["lr"], rel=1e-12), r["step"]
            for key in ("wd", "momentum", "teacher_temp"):
                assert r[key] == pytest.approx(a[key], rel=1e-12), (key, r["step"])
            compared += 1
    assert compared >= 2


def test_two_rank_runs_continue_on_one_process(runs, capsys):
    out, data, _ = runs
    for source in ("ddp", "fsdp"):
        step = 3  # epoch 1 after one of its two steps: 16 of its images trained on
        trainer = resume_on_one_process(out, data, source, step, capsys)
        assert trainer.step == step + 6  # the 3 remaining steps of 16 images are 6 steps of 8
        assert_schedules_continue(read_records(out / source), read_records(out / f"{source}_on1"), 0.5, step)
        before = trained(out, source, range(2, 3))  # epoch 1 before the checkpoint
        after = trained(out, f"{source}_on1", range(0, 3))  # the rest of epoch 1, in 3 steps of 8
        assert len(before) == 16 and len(after) == 24
        assert sorted(before + after) == list(range(IMAGES))  # each image of the epoch exactly once
        epoch2 = trained(out, f"{source}_on1", range(3, 6))
        assert len(set(epoch2)) == len(epoch2) == 24  # then a fresh epoch


def test_a_one_process_run_continues_on_two_ranks(runs):
    out, _, launch_output = runs
    step = 2  # 16 of epoch 0's 40 images trained on
    path = ckpt.checkpoint_path(out / "single", step)
    assert_state_equals_checkpoint(torch.load(out / "single_on2" / "state_rank0.pt"), path)
    assert ("by 1 process(es) (global batch 8, 5 steps/epoch), this run has 2 (global batch 16, 2 steps/epoch)"
            in launch_output)
    resumed = read_records(out / "single_on2")
    assert [r["step"] for r in resumed] == [3, 4]  # the 4 remaining steps of 8 images are 2 steps of 16
    assert_schedules_continue(read_records(out / "single"), resumed, 2.0, step)
    before = trained(out, "single", range(0, 2))
    after = trained(out, "single_on2", range(0, 1))  # the rest of epoch 0: 24 images, 16 in one global batch
    assert len(before) == 16 and len(after) == 16 and not set(before) & set(after)
    assert len(set(before + after)) == 32  # the last 8 fill no global batch: dropped, as at any epoch's end
