"""One training step outside the loop, for tests that drive the trainer step by step (GPU smoke tests).

`train_step` is the ONE place these tests call the trainer's per-step API. Today that is the private
`dinovmf.train._train_step`; when `Trainer(cfg).train_step(crops, step)` lands (trainer-architecture
issue), `build_step_state` / `train_step` switch to it and no test changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dinovmf.config import load_config

STEPS_PER_EPOCH = 1000
FIRST_STEP = 1000  # past the warm-ups: a non-zero learning rate


@dataclass
class StepState:
    cfg: object
    device: torch.device
    student: torch.nn.Module
    teacher: torch.nn.Module
    train_module: torch.nn.Module  # the student, or torch.compile of it
    teacher_fwd: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    frozen: list
    schedules: object


def config(overrides: list[str]):
    """A config from the defaults plus `overrides` (steps are driven by hand: no data is read)."""
    return load_config(None, ["optim.freeze_last_layer=0", *overrides])


def build_step_state(cfg, device: torch.device, seed: int = 0) -> StepState:
    """Student, EMA teacher, objective and optimizer of `cfg` on `device`, seeded like the trainer."""
    from dinovmf.objectives import build_objective, build_ssl_model
    from dinovmf.schedules import build_schedules
    from dinovmf.train import build_optimizer, last_layer_params

    torch.manual_seed(seed)
    student = build_ssl_model(cfg, cfg.model.drop_path).to(device)
    teacher = build_ssl_model(cfg, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    objective = build_objective(cfg).to(device)
    optimizer = build_optimizer(student, cfg, device)
    train_module, teacher_fwd = student, teacher
    if cfg.train.compile:
        train_module, teacher_fwd = torch.compile(student), torch.compile(teacher)
    return StepState(cfg, device, student, teacher, train_module, teacher_fwd, objective, optimizer,
                     last_layer_params(student), build_schedules(cfg, STEPS_PER_EPOCH))


def random_crops(cfg, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """2 global + n_local crops of normalised-looking noise, already on the device."""
    g = torch.Generator().manual_seed(seed)
    B = cfg.train.batch_size
    sizes = [cfg.crops.global_size] * 2 + [cfg.crops.local_size] * cfg.crops.n_local
    return [torch.randn(B, 3, s, s, generator=g).to(device) for s in sizes]


def train_step(state: StepState, step: int, crops: list[torch.Tensor]) -> dict:
    """One optimizer step on `crops`; the metrics dict (loss, ...) the trainer logs."""
    from dinovmf.train import _train_step

    return _train_step(state.cfg, step, state.schedules.at(FIRST_STEP + step), crops, state.train_module,
                       state.student, state.teacher_fwd, state.teacher, state.objective, state.optimizer,
                       state.frozen, None)
