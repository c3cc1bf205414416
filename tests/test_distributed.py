"""Distributed training on CPU (gloo), 2 processes: DDP and FSDP2 runs of the tiny config, an FSDP2 resume,
and 2 "nodes" on loopback through c10d rendezvous.

FSDP2 (issue #15): the prototypes stay bitwise unchanged through the freeze period and train after it; the
run matches the DDP run step for step; a checkpoint saved under FSDP2 resumes with identical per-step losses,
loads into a single process and exports.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_utils import read_records, tiny_config, write_image_folder

from dinovmf import checkpoint as ckpt
from dinovmf.cli import main
from dinovmf.distributed import any_rank, choose_backend, detect_launch
from dinovmf.models import build_ssl_model, load_backbone
from dinovmf.trainer import Trainer

TESTS = Path(__file__).resolve().parent
STEPS = 4  # 2 steps per epoch per rank (20 images each at batch 8): crosses an epoch boundary
# No warm-up (lr > 0 from step 0), so frozen prototypes would move at once; frozen for 1 epoch = 2 steps.
OVERRIDES = [f"steps={STEPS}", "optim.warmup_epochs=0", "optim.freeze_last_layer=1", "train.ckpt_every=1",
             "train.keep_last=10"]
FREEZE_STEPS = 2
# fsdpv3: FSDP2 on a DINOv3-style backbone (RoPE with its per-rank training rescale, registers, layer scale, SwiGLU)
DINOV3_STYLE = ["model.pos_encoding=rope", "model.num_register_tokens=2", "model.layerscale_init=0.1", "model.ffn=swiglu"]
RUNS = {"ddp": ["dist.fsdp=false"], "fsdp": ["dist.fsdp=true"], "fsdpv3": ["dist.fsdp=true", *DINOV3_STYLE]}

# One rank: trains the runs named on the command line (`fsdp_resumed` continues fsdp's step-2 checkpoint;
# `ddp_nan` feeds rank 1 a NaN batch)
# through the public Trainer, then dumps this rank's full student / teacher / center, so the test can
# compare ranks (a checkpoint holds rank 0's view only).
WORKER = f"""
import json, sys
from pathlib import Path
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
sys.path.insert(0, {str(TESTS)!r})
from _train_utils import HookedLoader, tiny_config
from dinovmf.distributed import cleanup, init_distributed
from dinovmf.stopping import NonFiniteLossError
from dinovmf.train import build_train_loader
from dinovmf.trainer import Trainer

out, data = Path(sys.argv[1]), sys.argv[2]
info = init_distributed("gloo")
runs = {json.dumps(RUNS)}
for name in sys.argv[3:]:
    cfg = tiny_config(data, None, {OVERRIDES!r} + runs[name.split("_")[0]])
    loader = build_train_loader(cfg, out / name, info)
    if name.endswith("_nan"):  # a NaN batch on rank 1 only, in step 3: every rank must stop there
        poison = lambda i, crops: [c * float("nan") for c in crops] if i == 2 and info.rank == 1 else crops
        try:
            Trainer(cfg, out / name, steps_per_epoch=len(loader)).fit(HookedLoader(loader, poison))
        except NonFiniteLossError as e:
            (out / name / f"rank{{info.rank}}.err").write_text(str(e))
        continue
    if name.endswith("_resumed"):
        start = out / name.replace("_resumed", "") / "checkpoints" / "step_0000002"
        trainer = Trainer.resume(start, cfg, out / name, steps_per_epoch=len(loader))
    else:
        trainer = Trainer(cfg, out / name, steps_per_epoch=len(loader))
    trainer.fit(loader)
    full = StateDictOptions(full_state_dict=True)  # the full tensors on every rank
    torch.save({{"student": get_model_state_dict(trainer.models.student, options=full),
                "teacher": get_model_state_dict(trainer.models.teacher, options=full),
                "center": trainer.objective.state_dict(), "world_size": info.world_size,
                "fsdp": trainer.models.fsdp}}, out / name / f"rank{{info.rank}}.pt")
cleanup()  # every process group destroyed before the interpreter exits (gloo aborts at exit otherwise)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], worker: Path, out: Path, data: Path, runs: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(worker), str(out), str(data), *runs]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(procs: list[subprocess.Popen], timeout: float = 900) -> None:
    """Wait for every process (a bound against hangs, far above their run time even on a loaded box); assert
    each exited 0, showing the tail of its output otherwise."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    worker = base / "worker.py"
    worker.write_text(WORKER)
    return worker, write_image_folder(base / "train", "train", 4)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """One 2-process launch: a DDP run, an FSDP2 run, the FSDP2 run resumed from its step-2 checkpoint, a
    DDP run whose rank 1 meets a NaN batch, and an FSDP2 run of a DINOv3-style backbone."""
    worker, data = setup
    out = tmp_path_factory.mktemp("runs")
    # --standalone: torchrun's own store binds a free port and keeps it (a port probed here could be taken by
    # another process before torchrun binds it).
    wait_all([torchrun(["--standalone", "--nproc_per_node", "2"], worker, out, data,
                       ["ddp", "fsdp", "fsdp_resumed", "ddp_nan", "fsdpv3"])])
    return out, data


def initial_state() -> dict:
    """The student's step-0 weights (every rank initialises with train.seed)."""
    cfg = tiny_config("unused", None, OVERRIDES)
    torch.manual_seed(cfg.train.seed)
    return build_ssl_model(cfg, 0.0).state_dict()


def assert_ranks_identical(run: Path) -> None:
    r0, r1 = (torch.load(run / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    for part in ("student", "teacher", "center"):
        assert r0[part].keys() == r1[part].keys()
        for key in r0[part]:
            assert torch.equal(r0[part][key], r1[part][key]), f"{part}.{key} differs between ranks"
    # Training moved the weights and the center (equality above is not two fresh initialisations).
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))
    assert saved["step"] == STEPS
    assert torch.equal(saved["teacher"]["head.v"], r0["teacher"]["head.v"])
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(r0["student"][key], initial_state()[key])
    assert not torch.allclose(r0["center"][next(iter(r0["center"]))], torch.full((64,), 1 / 64))


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_ranks_stay_identical(runs, name):
    out, _ = runs
    assert torch.load(out / name / "rank0.pt")["fsdp"] == (name == "fsdp")
    assert_ranks_identical(out / name)


def test_fsdp_shards_and_trains_a_dinov3_style_backbone(runs):
    """Every block's new parameters (layer scale, q / v biases, SwiGLU) and the RoPE periods are gathered
    identically on both ranks, trained, and in the checkpoint that a single process loads and exports."""
    out, _ = runs
    r0, r1 = (torch.load(out / "fsdpv3" / f"rank{r}.pt") for r in (0, 1))
    assert r0["fsdp"] and r0["world_size"] == 2
    for part in ("student", "teacher"):
        for key in r0[part]:
            assert torch.equal(r0[part][key], r1[part][key]), f"{part}.{key} differs between ranks"
    cfg = tiny_config("unused", None, OVERRIDES + RUNS["fsdpv3"])
    torch.manual_seed(cfg.train.seed)
    start = build_ssl_model(cfg, 0.0).state_dict()
    for key in ("backbone.blocks.1.ls2.gamma", "backbone.blocks.0.attn.q_bias", "backbone.blocks.0.mlp.fc1.weight"):
        assert not torch.equal(r0["student"][key], start[key]), f"{key} did not train"
    assert torch.equal(r0["student"]["backbone.rope.periods"], start["backbone.rope.periods"])
    exported = load_backbone(ckpt.latest_checkpoint(out / "fsdpv3" / "checkpoints"))
    assert exported.pos_encoding == "rope" and torch.equal(exported.blocks[1].ls2.gamma,
                                                           r0["teacher"]["backbone.blocks.1.ls2.gamma"])


def test_fsdp_prototypes_frozen_through_the_freeze_period_then_train(runs):
    """Issue #15: before the fix, head.v and head.g moved from step 1 on under FSDP2."""
    out, _ = runs
    init = initial_state()
    for step, path in ckpt.list_checkpoints(out / "fsdp" / "checkpoints"):
        state = ckpt.load_checkpoint(path)
        for net in ("student", "teacher"):
            for key in ("head.v", "head.g"):
                frozen = torch.equal(state[net][key], init[key])
                assert frozen == (step <= FREEZE_STEPS), f"{net}.{key} at step {step}: frozen={frozen}"


def test_fsdp_run_matches_the_ddp_run(runs):
    """Same data, same seeds: sharding changes where the arithmetic happens, not what the run computes."""
    out, _ = runs
    ddp, fsdp = read_records(out / "ddp"), read_records(out / "fsdp")
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, fsdp):
        for key in ("loss", "grad_norm", "teacher_entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), f"{key} at step {a['step']}"
    end_ddp = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "ddp" / "checkpoints"))
    end_fsdp = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "fsdp" / "checkpoints"))
    for net in ("student", "teacher"):
        for key, value in end_ddp[net].items():
            torch.testing.assert_close(end_fsdp[net][key], value, rtol=1e-4, atol=1e-5, msg=f"{net}.{key}")
    assert len({round(r["loss"], 6) for r in ddp}) > 1  # the losses move, so the comparison can fail


def test_fsdp_resume_gives_identical_per_step_losses(runs):
    out, _ = runs
    straight, resumed = read_records(out / "fsdp"), read_records(out / "fsdp_resumed")
    assert [r["step"] for r in resumed] == list(range(3, STEPS + 1))
    for a, b in zip(straight[2:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_fsdp_checkpoint_loads_in_one_process_and_exports(runs, tmp_path):
    out, data = runs
    path = ckpt.latest_checkpoint(out / "fsdp" / "checkpoints")
    state = ckpt.load_checkpoint(path)
    assert json.loads(json.dumps(state["config"]))["dist"]["fsdp"] is True
    trainer = Trainer.resume(path, out_dir=tmp_path / "single")  # the checkpoint's own config, one process
    assert not trainer.models.fsdp and trainer.step == STEPS
    for key, value in state["student"].items():
        assert torch.equal(trainer.models.student.state_dict()[key], value), key
    assert main(["export", str(path), str(tmp_path / "teacher.safetensors")]) == 0
    backbone = load_backbone(tmp_path / "teacher.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), trainer.models.teacher.backbone.eval()(x))


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(runs):
    """Rank 1 alone sees the NaN; had it raised alone, rank 0 would block in the gradient all-reduce (the
    launch would time out instead of returning)."""
    out, _ = runs
    errors = [(out / "ddp_nan" / f"rank{r}.err").read_text() for r in (0, 1)]
    assert "(on another rank) at step 3" in errors[0] and "(nan) at step 3" in errors[1]
    assert [s for s, _ in ckpt.list_checkpoints(out / "ddp_nan" / "checkpoints")] == [1, 2]


def test_two_nodes_on_loopback_c10d(setup, tmp_path):
    """Two torchrun "nodes" meet at a c10d rendezvous endpoint, which both must know in advance: a free port is
    probed here, and if another process takes it before the rendezvous binds it, the launch is tried again
    on a new one (the only race left, and it is retried rather than failed)."""
    worker, data = setup
    for attempt in range(3):
        args = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", f"dinovmf-test-{attempt}"]
        procs = [torchrun(args, worker, tmp_path, data, ["ddp"]) for _ in range(2)]
        try:
            wait_all(procs)
            break
        except AssertionError as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise
    assert_ranks_identical(tmp_path / "ddp")


def test_launch_detection():
    assert detect_launch({}) == (0, 1, 0)
    assert detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert detect_launch({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == (5, 16, 1)
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)  # one task: not distributed
    assert choose_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError, match="dist.backend"):
        choose_backend("mpi")
    assert any_rank(True, False) == [True, False]  # one process: the flags as they are
