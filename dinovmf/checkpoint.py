"""Training checkpoints: `out_dir/checkpoints/step_XXXXXXX.pt`, written atomically, the last k kept.

What goes in. The models and the optimizer go through `torch.distributed.checkpoint.state_dict`
(`gather_training_state` / `restore_training_state`), one path for one process, DDP and FSDP2 alike: the
file always holds FULL state dicts keyed by parameter names (`backbone.*`, `head.*`; the optimizer's state
by parameter name too), so a checkpoint written by a sharded run loads into a single process, into a run
with another world size, and into `dinovmf export`.

How it is written. A checkpoint is written to a temporary file in the same directory, flushed and
fsync'ed, then renamed over its final name with `os.replace` (atomic on POSIX within one filesystem), and
the directory is fsync'ed so the rename itself survives a crash. A job killed mid-write therefore leaves either the old
set of checkpoints or the new one, never a truncated `step_*.pt` that `--resume auto` would pick.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:07d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `directory`, oldest first (temp files ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` atomically (temp file in the same dir, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave a half-written temp file behind, whatever interrupted the write.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(directory)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def save_checkpoint(state: dict, out_dir: str | os.PathLike, keep_last: int) -> Path:
    """Write `state` (must hold "step") as out_dir/checkpoints/step_N.pt and prune to `keep_last`."""
    if "step" not in state:
        raise ValueError("checkpoint state needs a 'step' entry")
    path = atomic_save(state, checkpoint_path(out_dir, int(state["step"])))
    prune_checkpoints(checkpoint_dir(out_dir), keep_last)
    return path


def resolve_resume(resume: str | os.PathLike | None, out_dir: str | os.PathLike) -> Path | None:
    """`auto` -> the newest checkpoint in out_dir (None if there is none); a path -> that file."""
    if resume is None:
        return None
    if str(resume) == "auto":
        return latest_checkpoint(checkpoint_dir(out_dir))
    path = Path(resume)
    if not path.is_file():
        raise ValueError(f"--resume: checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # pickle / zip errors: the file is not a torch checkpoint
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{str(path)!r} is not a dinovmf training checkpoint (no 'step' entry)")
    return state


def gather_training_state(student: torch.nn.Module, teacher: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> dict:
    """{"student", "teacher", "optimizer"}: full, unsharded CPU state dicts, whatever the wrapping.

    Under FSDP2 this is a collective (every rank calls it; the shards are gathered to rank 0, other ranks
    get empty dicts). Pass the parallelised student (`ParallelModels.student`), not a DDP wrapper.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    stateless = _stateless_parameters(student, optimizer)
    optim_state = get_optimizer_state_dict(student, optimizer, options=opts)
    for name, param in stateless.items():  # see _stateless_parameters
        optimizer.state.pop(param, None)
        optim_state.get("state", {}).pop(name, None)
    return {"student": get_model_state_dict(student, options=opts),
            "teacher": get_model_state_dict(teacher, options=opts), "optimizer": optim_state}


def restore_training_state(state: dict, student: torch.nn.Module, teacher: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> None:
    """Load `gather_training_state`'s dicts (from `state`) into parallelised models and their optimizer.

    Every rank passes the full dicts (each rank reads the file); under FSDP2 each keeps its own shard.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, state["student"], options=opts)
    set_model_state_dict(teacher, state["teacher"], options=opts)
    # Not strict: AdamW has no state for a parameter that never had a gradient, which is every prototype
    # in a checkpoint written during the freeze period. The parameter sets themselves were checked
    # strictly just above.
    set_optimizer_state_dict(student, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    saved = state["optimizer"].get("state", {})
    for name, param in student.named_parameters():  # see _stateless_parameters
        if name not in saved:
            optimizer.state.pop(param, None)


def _stateless_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{name: parameter} of the trainable parameters the optimizer holds no state for (no gradient yet).

    `get/set_optimizer_state_dict` initialise a stateless optimizer with a zero-gradient, lr=0 step, which
    gives every parameter an Adam step count of 1. For a parameter that has not trained yet (the frozen
    prototypes) that count would shift its bias correction once it starts: such state is dropped again,
    so a run that saved or resumed follows the run that did neither.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad and p not in optimizer.state}


def rng_state() -> dict:
    """Every generator a training step draws from (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
