"""Frozen features of a backbone over an `EvalLoader`."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device: torch.device | str,
                     amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on CPU, labels [N] int64) of `backbone(images)` over `loader`.

    Features go to the CPU batch by batch, so memory on the device stays one batch; bf16 autocast on
    CUDA when `amp`.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda"
           else contextlib.nullcontext())
    try:
        for images, y in loader:
            with ctx:
                f = backbone(images.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches (empty dataset?)")
    return torch.cat(feats), torch.cat(labels)
