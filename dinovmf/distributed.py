"""Process-group set-up: one process, torchrun (one or many nodes) or SLURM srun.

The trainer asks this module for the rank / world size and a device and never touches
`torch.distributed` set-up itself; wrapping the models (DDP / FSDP2 / compile) is `dinovmf.parallelize`.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


_CONTROL_GROUP = None  # set by init_distributed under nccl: a gloo group for host-side flags


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None     # None when not distributed

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launch(env: dict | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0).

    torchrun (and torch.distributed.run) sets RANK / WORLD_SIZE / LOCAL_RANK plus MASTER_ADDR/PORT.
    Under plain `srun python -m dinovmf.cli train ...` we read SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID; MASTER_ADDR/PORT must then come from the job script (see the README).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def choose_backend(requested: str = "auto") -> str:
    """nccl when CUDA is available, gloo otherwise (`auto`); an explicit choice is checked."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"dist.backend must be auto, nccl or gloo, got {requested!r}")
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("dist.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    return requested


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched by torchrun / srun; a no-op for a single process."""
    rank, world_size, local_rank = detect_launch()
    if world_size == 1:
        return DistInfo()
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError("distributed launch detected (world size "
                           f"{world_size}) but MASTER_ADDR / MASTER_PORT are not set; launch with "
                           "torchrun, or export them in the SLURM script")
    name = choose_backend(backend)
    if name == "nccl":
        torch.cuda.set_device(local_rank)
    global _CONTROL_GROUP
    if not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        dist.init_process_group(name, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # Host-side control flags (stop signals, time limit) travel on a CPU group: an all-reduce of
        # a CUDA tensor would need a device sync to read, every step. Under gloo the default group is one.
        _CONTROL_GROUP = dist.new_group(backend="gloo") if name == "nccl" else None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=name)


def device_for(info: DistInfo) -> torch.device:
    """This process's GPU (by local rank) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def cleanup() -> None:
    global _CONTROL_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(*flags: bool) -> list[bool]:
    """Each of `flags` OR-ed over all ranks (a CPU all-reduce on the control group); as is alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return [bool(v) for v in t.tolist()]


def max_over_ranks(value: float) -> float:
    """The largest of every rank's `value` (a CPU all-reduce on the control group); `value` alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return float(t)
