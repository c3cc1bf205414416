"""Process-group set-up and model wrapping: one process, torchrun (one or many nodes) or SLURM srun.

Kept apart from the model code (torchtitan's split): the trainer asks this module for the rank / world
size, a device, and a wrapped student, and never touches `torch.distributed` set-up itself.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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
    if not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        dist.init_process_group(name, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=name)


def device_for(info: DistInfo) -> torch.device:
    """This process's GPU (by local rank) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (in place and returned); identity when not distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (e.g. the resume step); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when distributed, else `model` itself.

    `broadcast_buffers=False`: the backbone has no running statistics to sync, and broadcasting every
    forward would cost a collective per step for nothing.
    """
    if not info.is_distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], info: DistInfo,
               mixed_precision: bool = False) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the root (sharding the rest: embeddings, head).

    Sharding per block lets FSDP all-gather one block's weights at a time, which is what makes ViT-L
    with a 65536-prototype head fit next to its teacher. With `mixed_precision`, parameters are cast to
    bf16 for compute and gradients reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not info.is_distributed:
        return model
    kwargs = {}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers (FSDP2 modifies in place: nothing to unwrap)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
