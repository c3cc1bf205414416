"""One training step outside the loop, for tests that drive the trainer step by step (GPU smoke tests),
through the trainer's public per-step API: `Trainer(cfg, device=..., steps_per_epoch=...).train_step`."""
from __future__ import annotations

import torch

from dinovmf.config import load_config
from dinovmf.trainer import Trainer

STEPS_PER_EPOCH = 1000
FIRST_STEP = 1000  # past the warm-ups: a non-zero learning rate


def config(overrides: list[str]):
    """A config from the defaults plus `overrides` (steps are driven by hand: no data is read)."""
    return load_config(None, ["optim.freeze_last_layer=0", *overrides])


def build_step_state(cfg, device: torch.device, seed: int = 0) -> Trainer:
    """The Trainer of `cfg` on `device` (student, EMA teacher, objective, optimizer), seeded with `seed`."""
    cfg.train.seed = seed
    return Trainer(cfg, device=device, steps_per_epoch=STEPS_PER_EPOCH)


def train_step(trainer: Trainer, step: int, crops: list[torch.Tensor]) -> dict:
    """One optimizer step on `crops` (schedules past the warm-ups); the metrics dict (device tensors)."""
    return trainer.train_step(crops, FIRST_STEP + step)
