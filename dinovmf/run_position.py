"""`RunPosition`: where a run is, in the terms that carry over to another world size.

A checkpoint records the optimisation step, and that alone is enough only while every step has the same
size. A run resumed on another world size (or per-rank batch) takes steps of another size, so a
checkpoint also records, in samples and schedule positions, where the run is:

- the data: the epoch and how many entries of its permutation all ranks together have trained on (the
  loaders shard the rest of the epoch over the new ranks: `dinovmf.data.crops.epoch_order`);
- the schedules: their own units (steps per epoch and global batch of the run's start) and the position
  of the current step on their axis (`dinovmf.schedules.Continuation` moves on from there by samples).

`describe_change` is the line a resumed run prints when the world size or the global batch changed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RunPosition:
    step: int                      # optimisation steps done
    epoch: int                     # the data epoch being read
    epoch_position: int            # entries of that epoch's permutation trained on, over all ranks
    schedule_position: float       # where `step` sits on the schedules' axis
    world_size: int
    global_batch: int              # images per step over all ranks
    steps_per_epoch: int | None    # the loader's batches per epoch per rank (None: not known yet)
    schedule_steps_per_epoch: int | None  # the schedules' units: steps per epoch at the run's start ...
    schedule_global_batch: int            # ... and its global batch (what the peak lr was scaled for)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict) -> "RunPosition":
        """From a checkpoint's trainer state (version 2) or a version-1 checkpoint dict, which recorded the
        step only: its position follows from its own world size (the length of its per-rank RNG list)."""
        if "position" in state:
            return cls(**state["position"])
        world = len(state["rng"]) if isinstance(state.get("rng"), list) else 1
        batch = int(state["config"]["train"]["batch_size"]) * world
        step, spe = int(state["step"]), state.get("steps_per_epoch")
        epoch, done = divmod(step, spe) if spe else (0, step)
        return cls(step=step, epoch=epoch, epoch_position=done * batch, schedule_position=float(step),
                   world_size=world, global_batch=batch, steps_per_epoch=spe, schedule_steps_per_epoch=spe,
                   schedule_global_batch=batch)


def continued_schedules(saved: RunPosition, cfg, steps_per_epoch: int | None, global_batch: int):
    """The schedules of a run resuming at `saved` with `global_batch` images per step and this loader length
    (None: the checkpointed run's): its own schedules rebuilt in their units, continued by samples
    (`schedules.continue_schedules`). None when neither the checkpoint nor the caller knows a loader length."""
    from dinovmf.schedules import build_schedules, continue_schedules

    steps_per_epoch = steps_per_epoch or saved.steps_per_epoch
    if saved.schedule_steps_per_epoch is None:
        return None if steps_per_epoch is None else build_schedules(cfg, steps_per_epoch, global_batch=global_batch)
    base = build_schedules(cfg, saved.schedule_steps_per_epoch, global_batch=saved.schedule_global_batch)
    return continue_schedules(base, steps_per_epoch or base.steps_per_epoch, global_batch, saved.step,
                              saved.schedule_position)


def describe_change(saved: RunPosition, now: RunPosition, total_steps: int, lr: float) -> str | None:
    """The line a resumed run prints when its world size or global batch differs from the checkpoint's
    (None when neither does)."""
    if (saved.world_size, saved.global_batch) == (now.world_size, now.global_batch):
        return None
    return (f"resuming on another world size: the checkpoint was written by {saved.world_size} process(es) "
            f"(global batch {saved.global_batch}, {saved.steps_per_epoch} steps/epoch), this run has "
            f"{now.world_size} (global batch {now.global_batch}, {now.steps_per_epoch} steps/epoch). The run "
            f"continues by samples: the schedules from position {saved.schedule_position:g} of their "
            f"{saved.schedule_steps_per_epoch} steps/epoch at global batch {saved.schedule_global_batch} (peak lr "
            f"now {lr:.3g}: the lr per 256 images is unchanged), the data from sample {saved.epoch_position} of "
            f"epoch {saved.epoch}; it ends at step {total_steps}")
