"""The optimisation pieces of a DINO step: AdamW and its parameter groups, the per-step hyper-parameters,
gradient clipping and the teacher's EMA, each correct for plain, DDP and FSDP2-sharded (DTensor) parameters.
"""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, proto_norm_lr_mult: float = 1.0, layer_decay: float = 1.0,
                 backbone_groups: bool = False) -> list[dict]:
    """DINO's split: weight decay on matrices only; biases and 1-D parameters (norms, g, layer scale) undecayed.

    Parameters that never train (the frozen prototype norm g of `norm_last_layer=True`) are left out.
    With `proto_norm_lr_mult` != 1 the trainable prototype norms g get a third, undecayed group whose
    `lr_mult` scales the scheduled lr (at 1 there are two groups, as in checkpoints written before it).
    With `layer_decay` < 1 or `backbone_groups` (a backbone freeze, whose lr is scaled on its own) the groups
    are split further by layer: `layer_lr_mult` (BEiT / DINOv2 / DINOv3), and the backbone's groups carry
    `backbone=True` for `set_hyperparameters`' backbone lr scale.
    """
    from dinovmf.models import DINOHead

    norms = {id(h.g) for h in model.modules() if isinstance(h, DINOHead)} if proto_norm_lr_mult != 1 else set()
    by_layer = layer_decay != 1.0 or backbone_groups
    depth = len(model.backbone.blocks) if by_layer else 0
    groups: dict[str, dict] = {"decay": {"params": [], "name": "decay"},
                               "no_decay": {"params": [], "name": "no_decay", "weight_decay": 0.0}}
    proto_norm = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norms:
            proto_norm.append(p)
            continue
        kind = "no_decay" if name.endswith(".bias") or p.ndim <= 1 else "decay"
        if not by_layer:
            groups[kind]["params"].append(p)
            continue
        layer = layer_id(name, depth)
        key = f"{kind}/{'backbone' if layer is not None else 'head'}{'' if layer is None else f'.layer{layer}'}"
        if key not in groups:
            groups[key] = {"params": [], "name": key, "lr_mult": layer_lr_mult(layer, depth, layer_decay),
                           "backbone": layer is not None, **({"weight_decay": 0.0} if kind == "no_decay" else {})}
        groups[key]["params"].append(p)
    out = [g for g in groups.values() if g["params"] or not by_layer]
    if proto_norm:
        out.append({"params": proto_norm, "name": "proto_norm", "weight_decay": 0.0, "lr_mult": proto_norm_lr_mult})
    return out


# Backbone parameters at layer 0 of the layer-wise lr decay: the embeddings before the first block.
EMBEDDING_PARAMS = ("patch_embed.", "pos_embed", "cls_token", "reg_token", "mask_token")


def layer_id(name: str, depth: int) -> int | None:
    """The layer of a training network's parameter for layer-wise lr decay, as DINOv2 / DINOv3's
    `get_vit_lr_decay_rate`: embeddings 0, block i -> i + 1, the backbone's final norm depth + 1; None for the
    heads (outside the backbone)."""
    from dinovmf.models.export import strip_prefixes

    name = strip_prefixes(name)
    if not name.startswith("backbone."):
        return None
    name = strip_prefixes(name[len("backbone."):])
    if name.startswith(EMBEDDING_PARAMS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_lr_mult(layer: int | None, depth: int, decay: float) -> float:
    """decay^(depth + 1 - layer): 1 at the top (final norm, heads), decay^(depth + 1) for the embeddings."""
    return 1.0 if layer is None else decay ** (depth + 1 - layer)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) on CUDA and on CPU alike; lr/wd set per step.

    On CPU too the fused kernel is several times faster than foreach at DINO's head size (65536 x 256
    prototypes + a 2048-wide MLP), where foreach AdamW had been the largest part of a step (DESIGN §3).
    """
    groups = param_groups(model, cfg.optim.proto_norm_lr_mult, cfg.optim.layer_decay,
                          backbone_groups=cfg.optim.freeze_backbone_steps > 0)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
                             fused=True)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                        backbone_lr_scale: float = 1.0) -> None:
    """This step's learning rate (every group, times its `lr_mult`, and the backbone's groups times
    `backbone_lr_scale`) and weight decay (the decayed groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0) * (backbone_lr_scale if group.get("backbone") else 1.0)
        if group["name"].split("/")[0] == "decay":
            group["weight_decay"] = weight_decay


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most `max_norm`; returns the norm before (device).

    As `torch.nn.utils.clip_grad_norm_`, except that a sharded (FSDP2) norm is reduced to the full one
    first: the norm of the local shards alone would differ per rank and clip each rank differently.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # a DTensor: reduce the partial norms over the shards
        total = total.full_tensor()
    # clip_grads_with_norm_ multiplies by min(1, max_norm / (total + 1e-6)) without a host sync, i.e. a pass
    # over every gradient even when the factor is 1 (a full read and write of them, every step). On the
    # CPU reading the factor costs nothing (no device to wait for): skip the pass when it is exactly 1.
    if total.device.type != "cpu" or float(max_norm / (total + 1e-6)) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (one foreach op).

    Under FSDP2 both networks are resharded first (the root module keeps its parameters unsharded after
    a forward without backward, as the teacher's), so the update runs on matching local shards.
    """
    for model in (teacher, student):
        if hasattr(model, "reshard"):  # an FSDPModule
            model.reshard()
    t_params = [_local(p) for p in teacher.parameters()]
    s_params = [_local(p.detach()) for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
