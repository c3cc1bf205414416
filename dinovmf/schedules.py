"""Per-step hyper-parameter schedules (DINO's recipe), as pure functions of the step.

Pure functions rather than precomputed arrays (DINO's `cosine_scheduler`) so that a resumed run needs no
schedule state: the value at step `s` depends only on the config and `s`.

A run resumed on another world size (or per-rank batch) takes steps of another size. It keeps the
schedules of the run it continues and moves along them by samples (`Continuation`): a step of G images
advances the position by G / (the schedules' global batch), the lr follows the linear scaling rule for
the new global batch (the lr per 256 images is where it was), and the run ends when the samples the
original run would have seen are seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def cosine_schedule(step: int, total_steps: int, start: float, end: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `start` over `warmup_steps`, then cosine from `start` to `end`.

    Matches DINO's `cosine_scheduler` (warm-up value at step i is `warmup_start + i (start -
    warmup_start) / warmup_steps`; cosine over the remaining `total_steps - warmup_steps` steps), and
    holds `end` past `total_steps`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = total_steps - warmup_steps
    if span <= 0 or step >= total_steps:
        return end
    progress = (step - warmup_steps) / span
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over `warmup_steps`, then flat at `end` (teacher temperature)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class Schedules:
    """All per-step values of one run; `at(step)` returns them as a dict."""

    total_steps: int
    steps_per_epoch: int
    lr: float                      # peak, already scaled by the global batch size
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    global_batch: int = 256        # images per step, over all ranks (what `lr` was scaled for)
    freeze_backbone_steps: int = 0     # continued pretraining: the backbone fixed for these first steps,
    backbone_warmup_steps: int = 0     # then its lr warmed up again from 0 over these

    def position(self, step: int) -> float:
        """Where optimisation step `step` sits on these schedules' axis (itself: see `Continuation`)."""
        return float(step)

    def at(self, step: float) -> dict:
        return {
            "lr": cosine_schedule(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps),
            "wd": cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            "momentum": cosine_schedule(step, self.total_steps, self.momentum, self.momentum_end),
            "teacher_temp": linear_warmup(step, self.teacher_temp_warmup_steps,
                                          self.warmup_teacher_temp, self.teacher_temp),
            "freeze_last_layer": step < self.freeze_last_layer_steps,
            "freeze_backbone": step < self.freeze_backbone_steps,
            "backbone_lr_scale": self.backbone_lr_scale(step),
        }

    def backbone_lr_scale(self, step: float) -> float:
        """The factor on the backbone's lr: 0 while it is frozen, then linear to 1 over `backbone_warmup_steps`
        (a backbone whose AdamW moments start at zero would otherwise take full-size steps at once)."""
        if step < self.freeze_backbone_steps:
            return 0.0
        if not self.freeze_backbone_steps or not self.backbone_warmup_steps:
            return 1.0
        return min(1.0, (step - self.freeze_backbone_steps + 1) / self.backbone_warmup_steps)


@dataclass(frozen=True)
class Continuation:
    """The schedules of a run resumed with another global batch (module docstring): the same interface as
    `Schedules` (`at(step)`, `total_steps`, `steps_per_epoch`, `position(step)`), in this run's steps."""

    base: Schedules                # the schedules as the run started them (its global batch, its steps)
    steps_per_epoch: int           # this run's loader: batches per epoch per rank
    global_batch: int              # images per step now, over all ranks
    start_step: int                # the step the run resumed at
    start_position: float          # where that step sits on `base`'s axis

    @property
    def scale(self) -> float:
        """Positions on `base`'s axis per step of this run."""
        return self.global_batch / self.base.global_batch

    @property
    def total_steps(self) -> int:
        """The step at which the samples of the original run's `total_steps` are seen."""
        remaining = (self.base.total_steps - self.start_position) / self.scale
        return self.start_step + max(0, math.ceil(remaining - 1e-9))

    @property
    def lr(self) -> float:
        return self.base.lr * self.scale

    def position(self, step: int) -> float:
        return self.start_position + (step - self.start_step) * self.scale

    def at(self, step: int) -> dict:
        values = self.base.at(self.position(step))
        values["lr"] *= self.scale  # the linear scaling rule, for this run's global batch
        return values


def continue_schedules(base: Schedules, steps_per_epoch: int, global_batch: int, step: int,
                       position: float) -> Schedules | Continuation:
    """The schedules for a run resuming at optimisation step `step`, which sits at `position` on `base`'s
    axis, with `global_batch` images per step: `base` itself when nothing changed, else a Continuation."""
    if global_batch == base.global_batch and position == step and steps_per_epoch == base.steps_per_epoch:
        return base
    return Continuation(base, steps_per_epoch, global_batch, step, position)


def build_schedules(cfg, steps_per_epoch: int, world_size: int = 1, *, global_batch: int | None = None
                    ) -> Schedules:
    """The schedules of a run of `cfg` (a `dinovmf.config.Config`) with this loader length and world size.

    The run lasts `cfg.steps` steps, or `cfg.epochs` epochs when `steps` is unset; every schedule spans
    the run. Epoch-valued settings (warm-ups, last-layer freeze) convert at `steps_per_epoch` and are
    capped at the run length, so a short test run still ends its warm-ups. `global_batch`: images per
    step over all ranks (default `train.batch_size` x `world_size`), which scales the lr.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1 (is the dataset smaller than one batch?), "
                         f"got {steps_per_epoch}")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch

    def epochs_to_steps(epochs: float) -> int:
        return min(total, int(round(epochs * steps_per_epoch)))

    global_batch = cfg.train.batch_size * world_size if global_batch is None else global_batch
    return Schedules(
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        lr=cfg.optim.lr * global_batch / 256.0,  # the linear scaling rule
        min_lr=cfg.optim.min_lr,
        warmup_steps=epochs_to_steps(cfg.optim.warmup_epochs),
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end,
        momentum=cfg.optim.momentum_teacher,
        momentum_end=cfg.optim.momentum_teacher_end,
        teacher_temp=cfg.loss.teacher_temp,
        warmup_teacher_temp=cfg.loss.warmup_teacher_temp,
        teacher_temp_warmup_steps=epochs_to_steps(cfg.loss.warmup_teacher_temp_epochs),
        freeze_last_layer_steps=epochs_to_steps(cfg.optim.freeze_last_layer),
        global_batch=global_batch,
        freeze_backbone_steps=min(total, cfg.optim.freeze_backbone_steps),
        backbone_warmup_steps=epochs_to_steps(cfg.optim.warmup_epochs),
    )
