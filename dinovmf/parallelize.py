"""Parallelise, then capture: DDP or FSDP2 (and torch.compile) applied to the student and teacher in one step.

Everything that holds parameters (the optimizer, the list of frozen prototypes, gradient clipping, the EMA)
is built from the handles `parallelize` returns, never before it: FSDP2's `fully_shard` replaces every
parameter of a module by a new sharded DTensor parameter, so a reference taken earlier points at a tensor
nobody trains (issue #15: under FSDP2 the "frozen" prototypes trained, because `p.grad = None` cleared the
gradients of the pre-sharding tensors). Whether the run is sharded is decided here, once
(`ParallelModels.fsdp`), and read from there by the rest.

The split follows torchtitan: the models know nothing about parallelism, this module nothing about losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dinovmf.distributed import DistInfo
from dinovmf.models import SSLModel


@dataclass(frozen=True)
class ParallelModels:
    """The handles a training loop needs after parallelisation.

    `student` is the network whose parameters train: build the optimizer, the frozen-parameter list and
    the clipping from ITS parameters (sharded in place under FSDP2; the same objects DDP reduces).
    `student_forward` is what the step calls (DDP(student) under DDP, else `student` itself);
    `teacher` is the EMA network (sharded like the student under FSDP2, so their local shards match).
    """
    student: SSLModel
    teacher: SSLModel
    student_forward: nn.Module
    fsdp: bool


def parallelize(student: SSLModel, teacher: SSLModel, info: DistInfo, device: torch.device, *,
                fsdp: bool = False, compile: bool = False, mixed_precision: bool = False,
                ddp_options: dict | None = None) -> ParallelModels:
    """Apply torch.compile (per block and head), then FSDP2 (`fsdp` and distributed) or DDP (distributed).

    `fsdp` is ignored in a single process (there is nothing to shard). `mixed_precision` (FSDP2 only):
    bf16 parameters for compute, fp32 gradient reduction. `ddp_options`: DDP keyword arguments
    (`ddp_options(cfg.dist)`: bucket_cap_mb, gradient_as_bucket_view, static_graph).
    """
    if compile:
        # Per block, as torchtitan: the graphs compose with FSDP2's per-block all-gathers and DDP's bucket
        # hooks, and `Module.compile` keeps the module tree, hence the state_dict keys, unchanged.
        for model in (student, teacher):
            for module in _compile_units(model):
                module.compile()
    sharded = fsdp and info.is_distributed
    if sharded:
        for model in (student, teacher):
            _fully_shard(model, mixed_precision)
        return ParallelModels(student, teacher, student, fsdp=True)
    if info.is_distributed:
        # broadcast_buffers=False: the backbone has no running statistics, and broadcasting on every
        # forward would cost a collective per step for nothing.
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(student, device_ids=ids, broadcast_buffers=False,
                                                  **(ddp_options or {}))
        return ParallelModels(student, teacher, ddp, fsdp=False)
    return ParallelModels(student, teacher, student, fsdp=False)


def ddp_options(dist) -> dict:
    """The DDP keyword arguments of a `dinovmf.config.DistConfig` (`dist.bucket_cap_mb`, ...).

    `static_graph` is valid here because every trainable parameter receives a gradient on every step: the
    frozen prototypes get theirs in backward too (the trainer drops it afterwards, DINO's
    cancel_gradients_last_layer), and the mask token, which only iBOT trains, has requires_grad off
    otherwise. tests/test_scaling.py checks that the knobs train exactly like the defaults.
    """
    return {"bucket_cap_mb": dist.bucket_cap_mb, "gradient_as_bucket_view": dist.gradient_as_bucket_view,
            "static_graph": dist.static_graph}


def _compile_units(model: SSLModel) -> list[nn.Module]:
    heads = [model.head] + ([model.patch_head] if model.patch_head is not None else [])
    return list(model.backbone.blocks) + heads


def _fully_shard(model: SSLModel, mixed_precision: bool) -> None:
    """FSDP2: `fully_shard` each transformer block, then the root (the rest: embeddings, heads).

    Sharding per block lets FSDP all-gather one block's weights at a time, which is what makes ViT-L
    with a 65536-prototype head fit next to its teacher.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.backbone.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
