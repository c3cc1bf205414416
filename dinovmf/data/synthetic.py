"""Synthetic multi-crop batches: random normalised pixels shaped as the loader delivers them.

For what measures or checks the step without the data path (the step and scaling benchmarks, smoke
runs, tests): the model, loss and optimizer see the same tensors a real batch would give them.
"""
from __future__ import annotations

import torch


def synthetic_crops(crops, batch: int, device: torch.device | str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """`crops.crop_specs()` as [batch, 3, size, size] standard-normal tensors (global crops first) on `device`,
    drawn from their own generator seeded with `seed` (the caller's RNG is left alone).

    `crops`: a `dinovmf.config.CropsConfig` (the config's `crops`)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g).to(device) for size, _ in crops.crop_specs()]
