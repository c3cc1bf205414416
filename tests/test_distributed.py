"""Distributed training on CPU (gloo): 2 processes on one node, and 2 "nodes" on loopback through
c10d rendezvous; weights and center must be identical on every rank after training."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_utils import write_image_folder

from dinovmf import checkpoint as ckpt
from dinovmf.distributed import choose_backend, detect_launch

TESTS = Path(__file__).resolve().parent
STEPS = 3  # 2 steps per epoch per rank (20 images each at batch 8): crosses an epoch boundary

# Runs one rank: trains the tiny config and, whenever a checkpoint is saved, also dumps this rank's
# own student / teacher / center so the test can compare ranks (the checkpoint holds rank 0's only).
WORKER = f"""
import sys
import torch
sys.path.insert(0, {str(TESTS)!r})
from _train_utils import tiny_config
from dinovmf import distributed as D
from dinovmf import train as T

out, data = sys.argv[1], sys.argv[2]
real_save = T._save

def save_and_dump(cfg, out_dir, step, student, teacher, optimizer, objective, info):
    real_save(cfg, out_dir, step, student, teacher, optimizer, objective, info)
    torch.save({{"student": D.unwrap(student).state_dict(), "teacher": teacher.state_dict(),
                "center": objective.state_dict(), "world_size": info.world_size}},
               f"{{out}}/rank{{info.rank}}_step{{step}}.pt")

T._save = save_and_dump
T.train(tiny_config(data, None, ["steps={STEPS}"]), out)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    worker = base / "worker.py"
    worker.write_text(WORKER)
    return worker, write_image_folder(base / "train", "train", 4)


def torchrun(args: list[str], worker: Path, out: Path, data: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(worker), str(out), str(data)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> None:
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


def assert_ranks_identical(out: Path) -> None:
    r0, r1 = (torch.load(out / f"rank{r}_step{STEPS}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    for part in ("student", "teacher", "center"):
        assert r0[part].keys() == r1[part].keys()
        for key in r0[part]:
            assert torch.equal(r0[part][key], r1[part][key]), f"{part}.{key} differs between ranks"
    # Training moved the weights (so equality above is not trivially two fresh initialisations).
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert saved["step"] == STEPS
    assert torch.equal(saved["teacher"]["head.v"], r0["teacher"]["head.v"])
    assert not torch.allclose(r0["center"][next(iter(r0["center"]))], torch.full((64,), 1 / 64))


def test_two_processes_one_node_gloo(setup, tmp_path):
    worker, data = setup
    wait_all([torchrun(["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port())], worker, tmp_path, data)])
    assert_ranks_identical(tmp_path)


def test_two_nodes_on_loopback_c10d(setup, tmp_path):
    worker, data = setup
    port = free_port()
    args = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "dinovmf-test"]
    wait_all([torchrun(args, worker, tmp_path, data), torchrun(args, worker, tmp_path, data)])
    assert_ranks_identical(tmp_path)


def test_launch_detection():
    assert detect_launch({}) == (0, 1, 0)
    assert detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert detect_launch({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == (5, 16, 1)
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)  # one task: not distributed
    assert choose_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError, match="dist.backend"):
        choose_backend("mpi")
