"""The faults a cluster run meets, caused for real and bounded in time (issue #24).

- A worker SIGKILLed under `torchrun --max-restarts 1` (one node, and two "nodes" through the c10d
  rendezvous): the workers restart, resume from the newest checkpoint and finish, and every logged loss,
  before and after the restart, equals the uninterrupted 2-process run's bit for bit (CPU runs with one
  seed are bit-reproducible: tests/test_data_loader.py has the FFCV thread fix that made them so).
- A rank SIGSTOPped with a short `dist.timeout_s`: the other exits with code 3 within the bound, naming
  the stopped rank and its step, with its own Python stacks.
- SIGUSR1 (SLURM's `--signal=USR1@120`): saved, exit code 75, and the resumed run continues exactly.
- Point 7: a truncated / foreign .beton, a 20000 x 20000 PNG, crop sizes the patch grid cannot tile,
  negative weight decay and clipping, a loss sitting at ln K before a NaN.

Every subprocess has a timeout, and the processes a test starts are killed when it ends.
"""
from __future__ import annotations

import math
import os
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _launch_utils import finish, free_port, kill_all, launch, torchrun_worker, wait_for_step, wait_until
from _train_utils import HookedLoader, fit, read_records, signal_before_batch, tiny_config, write_image_folder
from conftest import require_ffcv

from dinovmf import checkpoint as ckpt
from dinovmf.cli import main
from dinovmf.config import dump_yaml, load_config
from dinovmf.stopping import EXIT_HUNG, EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteLossError, StopSignal

STEPS = 12  # 2 steps per epoch per rank in the 2-process runs (20 images each at batch 8)
RUN = [f"steps={STEPS}", "train.ckpt_every=2", "train.keep_last=10", "optim.warmup_epochs=1"]
LAUNCH_TIMEOUT_S = 400  # bounds, not timings: generous for a loaded 2-core box


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny config as YAML, its data folder)."""
    base = tmp_path_factory.mktemp("faults")
    data = write_image_folder(base / "train", "train", 4)
    config = base / "tiny.yaml"
    config.write_text(dump_yaml(tiny_config(data, None)))
    return config, data


def train_command(config: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "dinovmf.cli", "train", "--config", str(config), "--out", str(out), "--resume", "auto",
            *RUN, *extra]


def torchrun(*args: str, nproc_per_node: int = 2) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node), *args]


def losses(out: Path) -> dict[int, list[float]]:
    """Every logged loss per step (a step logged by two attempts appears twice)."""
    by_step: dict[int, list[float]] = {}
    for r in read_records(out):
        by_step.setdefault(r["step"], []).append(r["loss"])
    return by_step


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """Per-step losses of the uninterrupted 2-process run (torchrun, one node)."""
    config, _ = setup
    out = tmp_path_factory.mktemp("reference")
    [log] = finish([launch(torchrun("--standalone") + train_command(config, out))], LAUNCH_TIMEOUT_S)
    assert f"step {STEPS}/{STEPS}" in log, log[-3000:]
    by_step = losses(out)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert len({round(v[0], 6) for v in by_step.values()}) > 1  # the losses move: the comparisons can fail
    return {s: v[0] for s, v in by_step.items()}


# ---------------------------------------------------------------------------------- restarts

@pytest.mark.parametrize("rendezvous", ["standalone", "c10d"])
def test_sigkilled_worker_is_restarted_resumes_and_matches_the_uninterrupted_run(setup, uninterrupted, tmp_path,
                                                                                  rendezvous):
    """SIGKILL of rank 1 after step 3: torchrun restarts both workers (before the fix the new attempt hung in
    gloo's connectFullMesh on the old attempt's store keys), they resume from the newest checkpoint and
    finish. With two c10d "nodes" the agents' restart counts differ (the surviving node's agent restarts
    without counting), which is why the attempt's store namespace is agreed through the store."""
    config, _ = setup
    out = tmp_path / "run"
    command = train_command(config, out)
    if rendezvous == "standalone":
        procs = [launch(torchrun("--standalone", "--max-restarts", "1") + command)]
    else:
        port = free_port()
        args = torchrun("--nnodes", "2", "--max-restarts", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                        f"127.0.0.1:{port}", "--rdzv_id", f"faults{port}", nproc_per_node=1)
        procs = [launch(args + command), launch(args + command)]
    wait_for_step(out, 3, procs)
    # Multi-process saves are asynchronous: kill once a checkpoint is complete (renamed into place), so that
    # the restart has one to resume from.
    wait_until(lambda: ckpt.list_checkpoints(ckpt.checkpoint_dir(out)), procs, 300, "a checkpoint was complete")
    reached = max(r["step"] for r in read_records(out))
    os.kill(torchrun_worker([p.pid for p in procs], 1), signal.SIGKILL)
    killed_at = time.monotonic()
    logs = finish(procs, LAUNCH_TIMEOUT_S)
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    log = "\n".join(logs)
    assert "process group: attempt 2" in log  # the restarted workers joined a new namespace
    resumed = int(log.split("resumed from step ")[1].split()[0])
    assert 2 <= resumed <= reached + 1 < STEPS and resumed % 2 == 0  # the newest checkpoint at the kill
    by_step = losses(out)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert all(len(v) == 2 for s, v in by_step.items() if resumed < s <= reached)  # logged by both attempts
    for step, values in by_step.items():
        assert values == [uninterrupted[step]] * len(values), f"step {step}: {values} vs {uninterrupted[step]}"
    assert time.monotonic() - killed_at < LAUNCH_TIMEOUT_S


def test_attempts_agree_on_their_number_through_a_store_holding_older_attempts_keys():
    """The handshake behind the restarts, ranks as threads on one in-memory store: a complete attempt, an
    attempt that broke before rank 2 joined (its rank 1 left a token and a confirmation behind), then an
    attempt whose ranks start in any order: every rank of it gets the same, new number."""
    from datetime import timedelta

    import torch.distributed as dist

    from dinovmf.distributed import _join_attempt

    store = dist.HashStore()

    def attempt(ranks, world_size=3, timeout_s=10.0, delays=None):
        results, errors = {}, {}

        def join(r):
            time.sleep((delays or {}).get(r, 0.0))
            try:
                results[r] = _join_attempt(store, r, world_size, timedelta(seconds=timeout_s))
            except RuntimeError as e:
                errors[r] = str(e)

        threads = [threading.Thread(target=join, args=(r,)) for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        return results, errors

    assert attempt([0, 1, 2]) == ({0: 1, 1: 1, 2: 1}, {})
    results, errors = attempt([0, 1], timeout_s=0.5)  # rank 2 died before joining: rank 0 gives up
    assert results == {1: 2} and "rank(s) [2] did not join attempt 2" in errors[0]
    for delays in ({0: 0.3}, {1: 0.3, 2: 0.3}):  # rank 0 last (old tokens wait for it), or first
        results, _ = attempt([0, 1, 2], delays=delays)
        assert len(set(results.values())) == 1 and set(results) == {0, 1, 2}
    assert results[0] == 4


# ---------------------------------------------------------------------------------- hangs

def test_a_stopped_rank_is_named_and_the_run_exits_within_the_timeout(setup, tmp_path):
    """SIGSTOP of rank 1 (two processes as srun starts them: rank 0 hosts the store): rank 0's watchdog
    finds rank 1's heartbeat frozen and exits with EXIT_HUNG, naming rank 1 and its step, with its own
    Python stacks, before `dist.timeout_s` (gloo's own timeout would raise a message naming no rank)."""
    config, _ = setup
    timeout_s = 20
    out = tmp_path / "run"
    port = free_port()
    command = train_command(config, out, "steps=100000", f"dist.timeout_s={timeout_s}")
    procs = [launch(command, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port)) for rank in (0, 1)]
    try:
        wait_for_step(out, 3, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        output = procs[0].communicate(timeout=3 * timeout_s)[0]
        elapsed = time.monotonic() - stopped
    finally:
        kill_all(procs)
    assert procs[0].returncode == EXIT_HUNG, output[-3000:]
    assert elapsed < timeout_s, f"rank 0 exited {elapsed:.1f} s after rank 1 stopped"
    report = output[output.index("dinovmf watchdog, rank 0"):]
    assert "Silent" in report and "rank 1 (at step " in report, report[:2000]
    named_step, logged_step = int(report.split("rank 1 (at step ")[1].split(")")[0]), read_records(out)[-1]["step"]
    # rank 0 logs the steps both ranks did; rank 1's heartbeat carries its step at most MIN_BEAT_S late
    assert logged_step - 2 <= named_step <= logged_step + 1, (named_step, logged_step)
    assert "most recent call first" in report and "in _run" in report  # faulthandler's stacks of rank 0


# ---------------------------------------------------------------------------------- preemption

def test_sigusr1_saves_exits_75_and_the_resumed_run_is_exact(setup, tmp_path):
    """SLURM's --signal=USR1@120: the step in flight finishes, a checkpoint is saved, `dinovmf train` exits
    75 (EX_TEMPFAIL, what a requeue wrapper tests for); `--resume auto` then continues the same trajectory."""
    config, _ = setup
    single = ["train.batch_size=4"]  # 10 steps per epoch in one process
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    fit(load_config(str(config), RUN + single), straight)  # what `dinovmf train` runs, without its plots

    def send_when_logged():
        path = stopped / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (path.exists() and '"step": 2,' in path.read_text()):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=send_when_logged, daemon=True)
    sender.start()
    assert main(train_command(config, stopped, *single)[2:]) == EXIT_PREEMPTED
    sender.join(timeout=10)
    saved = [s for s, _ in ckpt.list_checkpoints(stopped / "checkpoints")][-1]
    assert 2 <= saved < STEPS and max(r["step"] for r in read_records(stopped)) == saved
    assert main(train_command(config, stopped, *single)[2:]) == 0
    assert {r["step"]: r["loss"] for r in read_records(stopped)} == {r["step"]: r["loss"]
                                                                   for r in read_records(straight)}


@pytest.mark.parametrize("sig, code", [(signal.SIGUSR2, EXIT_PREEMPTED), (signal.SIGTERM, EXIT_PREEMPTED),
                                       (signal.SIGINT, EXIT_INTERRUPTED)])
def test_stop_signals_and_their_exit_codes(setup, tmp_path, sig, code):
    """SIGUSR2 / SIGTERM (a scheduler) and SIGINT (Ctrl-C) stop after the step in flight, saved; the exit
    code tells a requeue wrapper which."""
    _, data = setup
    summary, _ = fit(tiny_config(data, None, ["steps=6"]), tmp_path, signal_before_batch(1, sig))
    assert summary["interrupted"] and summary["step"] == 2 and summary["exit_code"] == code
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2]
    with StopSignal():
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


# ---------------------------------------------------------------------------------- point 7: data

@pytest.fixture(scope="module")
def good_beton(tmp_path_factory) -> bytes:
    require_ffcv()
    from dinovmf.data.prepare import prepare_dataset
    base = tmp_path_factory.mktemp("beton")
    folder = write_image_folder(base / "images", "train", 2)
    return prepare_dataset(folder, base / "good.beton", num_workers=1, progress=False).out.read_bytes()


@pytest.mark.parametrize("damage", ["half", "table", "header", "random"])
def test_a_damaged_beton_is_named_with_its_cause(good_beton, tmp_path, capsys, damage):
    """Before: `error: negative dimensions are not allowed`. Now the file and the cause, before training."""
    good = good_beton
    bad = tmp_path / "bad.beton"
    cut = {"half": len(good) // 2, "table": len(good) - 5, "header": 10, "random": len(good)}[damage]
    bad.write_bytes(np.random.default_rng(0).bytes(cut) if damage == "random" else good[:cut])
    code = main(["train", "--config", "demo", "--out", str(tmp_path / "run"), f"data.train={bad}",
                 "data.val=null", "data.loader=ffcv", "steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err, err
    assert ("not an FFCV .beton" if damage == "random" else "truncated") in err, err
    assert "negative dimensions" not in err


def _huge_png(path: Path, width: int, height: int) -> None:
    """A 1-bit PNG, left half white, right half black, written row by row (a few MB for 20000 x 20000)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row_bytes = (width + 7) // 8
    row = b"\0" + b"\xff" * (row_bytes // 2) + b"\0" * (row_bytes - row_bytes // 2)
    packer = zlib.compressobj(6)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_20000_px_png_is_too_large_not_corrupt_and_max_resolution_shrinks_it(tmp_path):
    require_ffcv()
    from dinovmf.data.fallback_loader import BetonImages
    from dinovmf.data.prepare import prepare_dataset
    folder = write_image_folder(tmp_path / "images", "train", 1, size=32)
    big = next(folder.iterdir()) / "huge.png"
    _huge_png(big, 20000, 20000)

    report = prepare_dataset(folder, tmp_path / "a.beton", num_workers=1, progress=False)
    assert report.too_large == [big] and report.corrupt == [] and report.num_images == 10
    assert "too large" in report.summary() and "--max-resolution" in report.summary()
    assert f"{big} (20000 x 20000)" in report.summary()

    report = prepare_dataset(folder, tmp_path / "b.beton", max_resolution=64, num_workers=1, progress=False)
    assert report.too_large == [] and report.num_images == 11
    images = BetonImages(tmp_path / "b.beton")
    shrunk = [np.asarray(images.image(i)) for i in range(len(images)) if images.image(i).size == (64, 64)]
    assert len(shrunk) == 1
    assert shrunk[0][:, :30].min() > 200 and shrunk[0][:, 34:].max() < 50  # the picture, not noise


# ---------------------------------------------------------------------------------- point 7: config

@pytest.mark.parametrize("override, key", [
    ("crops.global_size=7", "crops.global_size"), ("crops.global_size=36", "crops.global_size"),
    ("crops.local_size=12", "crops.local_size"), ("eval.image_size=20", "eval.image_size"),
    ("optim.weight_decay=-5", "optim.weight_decay"), ("optim.weight_decay_end=-1", "optim.weight_decay_end"),
    ("optim.clip_grad=-1", "optim.clip_grad"), ("optim.min_lr=-1e-6", "optim.min_lr"),
    ("dist.timeout_s=0", "dist.timeout_s"), ("dist.timeout_s=nan", "dist.timeout_s")])
def test_values_no_run_can_use_fail_at_validation_naming_the_key(override, key):
    with pytest.raises(ValueError, match=f"config: {key.replace('.', '[.]')}"):
        load_config("demo", [override])  # demo: patch 8, crops 32 / 16


def test_the_loss_sitting_at_ln_k_warns_before_the_nan_and_the_nan_names_the_logged_step(setup, tmp_path):
    """What optim.lr=1e4 does to the demo (measured: the student's entropy sat at ln K from step 8, NaN at
    step 11): here made exact, the head's last layer zeroed and the lr ~0, so the student is uniform from
    the first step, then a NaN batch in step 5. With the demo's log_every=5 the warning used to need three
    log steps (15 steps) of a uniform *teacher*; it now fires from the entropies read with the loss."""
    _, data = setup
    cfg = tiny_config(data, None, ["steps=20", "train.log_every=2", "optim.lr=1e-30", "optim.min_lr=0",
                                   "optim.warmup_epochs=0"])

    def nan_in_step_5(i, crops):
        return [c * float("nan") for c in crops] if i == 4 else crops

    from dinovmf.distributed import DistInfo
    from dinovmf.train import build_train_loader
    from dinovmf.trainer import Trainer
    loader = HookedLoader(build_train_loader(cfg, tmp_path, DistInfo()), nan_in_step_5)
    trainer = Trainer(cfg, tmp_path, steps_per_epoch=len(loader))
    last = trainer.models.student.head.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        trainer.fit(loader)
    [warning] = [r for r in read_records(tmp_path, "warning") if r["warning"] == "collapse"]
    assert "uniform" in warning["message"] and warning["step"] == 3
    assert [r["step"] for r in read_records(tmp_path)] == [2, 4]
    assert all(abs(r["loss"] - math.log(64)) < 1e-4 for r in read_records(tmp_path))
    assert read_records(tmp_path, "error")[0]["step"] == 5
