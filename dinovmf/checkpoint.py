"""Training checkpoints: what they hold, where they live, how they are found, verified and read.

Format (version 2). A checkpoint is a directory `out_dir/checkpoints/step_XXXXXXX/`:

    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP): every rank's shard of the tensors
    trainer.json                   the trainer's own state: step, data position, schedules, config, ...
    manifest.json                  size and CRC-32 of every file above, written last

The tensors form one flat dict: `student/<param>`, `teacher/<param>`, `optimizer/<param>/<exp_avg|
exp_avg_sq|step>`, `loss/<buffer>` (the centers) and `rng/<rank>/<generator>` (every rank's RNG state as
tensors). Under FSDP2 the model and optimizer entries are DTensors, so each rank writes its own shard;
under DDP (replicated state) each rank writes a share of the entries (`checkpoint_writer`). DCP records
the global shape and the chunks of each entry, so `dcp.load` reshards: a checkpoint written by N ranks
loads on M ranks, or in one process as full tensors (`load_checkpoint`: export, eval, attention,
model.init_from). Nothing in a checkpoint is a pickled object (the trainer state is JSON), and reading one
never unpickles anything but DCP's metadata, through an allowlist (`dinovmf.serialization`).

How it is written (`dinovmf.checkpoint_writer`): into `.step_XXXXXXX.tmp/`, renamed to `step_XXXXXXX/`
once every rank's shard, DCP's metadata, trainer.json and the manifest are on disk (fsync'ed): a crash
mid-write leaves the previous set and a temporary directory that `remove_stale_temporaries` deletes at
the next start. `verify_checkpoint` checks the manifest's sizes and checksums; `resolve_resume("auto")`
takes the newest checkpoint that verifies, warning about each one it skips.

Version 1 (before issue 25): one file `step_XXXXXXX.pt`, `torch.save` of full state dicts. Such files are
still listed, verified (their zip CRCs), resumed from and read by every loader, with
`torch.load(weights_only=True)`; nothing writes them any more.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dinovmf.serialization import (TRUST_PICKLE, UnsafeFileError, load_torch_file, read_dcp_metadata,
                                   safe_load_planner, safe_reader)

FORMAT = "dinovmf.checkpoint"
VERSION = 2
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
NETWORKS = ("student", "teacher")
PARTS = NETWORKS + ("optimizer", "loss", "rng")
_DIR = re.compile(r"^step_(\d{7,})$")
_FILE = re.compile(r"^step_(\d{7,})\.pt$")  # version 1
# What an interrupted write leaves: `.step_N.tmp` (a directory being written), `.step_N.replaced` (a
# checkpoint of the same step being overwritten) and version 1's `.step_N.pt.XXXX.tmp` files.
_TEMPORARY = re.compile(r"^\.step_(\d{7,})(\.tmp|\.replaced|\.pt\..*\.tmp)$")
_CHUNK = 8 << 20
# DCP warns on every save / load in one process that it assumes one process: that is what dinovmf asks for.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)


class CheckpointUnreadable(ValueError):
    """A checkpoint that cannot be used: missing files, wrong sizes or checksums, unreadable contents."""


# ------------------------------------------------------------------------------------------ naming


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(out_dir) / step_name(step)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def temporary_path(directory: str | os.PathLike, step: int, kind: str = "tmp") -> Path:
    return Path(directory) / f".{step_name(step)}.{kind}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `directory` (directories and version-1 files), oldest first;
    at equal steps a directory sorts after (is newer than) a version-1 file. Temporaries are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _DIR.match(p.name) if p.is_dir() else _FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p.is_dir(), p))
    return [(step, p) for step, _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory` by name (not verified: see `resolve_resume`)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete what interrupted writes left in `directory`; returns the paths removed. A `.step_N.replaced`
    directory is a complete checkpoint caught between two renames: it is put back when `step_N` is
    missing. Call it before any write starts (rank 0, at the start of a run)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        m = _TEMPORARY.match(p.name)
        if not m:
            continue
        final = directory / step_name(int(m.group(1)))
        if m.group(2) == ".replaced" and not final.exists():
            os.replace(p, final)
            continue
        _remove(p)
        removed.append(p)
    return removed


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (directories and version-1 files)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = [p for _, p in list_checkpoints(directory)[:-keep_last]]
    for p in doomed:
        _remove(p)
    return doomed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint (a directory's files, or a version-1 file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# ----------------------------------------------------------------------------------- verification


def file_digest(path: str | os.PathLike) -> dict:
    """{"bytes": size, "crc32": CRC-32 of the contents}: what the manifest records for each file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def write_json(path: Path, obj) -> None:
    """`obj` as JSON at `path`, flushed and fsync'ed (files in a checkpoint directory are final)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise `CheckpointUnreadable` (saying why) unless every file of checkpoint `path` has the size and
    checksum its manifest records (a directory), or every member of the zip has its CRC (version 1)."""
    path = Path(path)
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointUnreadable(f"not a readable torch file ({e})") from None
        if bad is not None:
            raise CheckpointUnreadable(f"member {bad!r} fails its CRC check")
        return
    if not path.is_dir():
        raise CheckpointUnreadable("does not exist")
    manifest = _read_json(path / MANIFEST, "its manifest")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointUnreadable(f"{MANIFEST} is not a {FORMAT} manifest")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointUnreadable(f"{name} is missing")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointUnreadable(f"{name} has {size} bytes, the manifest says {expected.get('bytes')}")
        if file_digest(file)["crc32"] != expected.get("crc32"):
            raise CheckpointUnreadable(f"{name} fails its checksum (the manifest's CRC-32 differs)")


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointUnreadable(f"{path.name} is missing ({what})") from None
    except (OSError, ValueError) as e:
        raise CheckpointUnreadable(f"{path.name} cannot be read ({what}): {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointUnreadable(f"{path.name} is not a JSON object ({what})")
    return obj


def resolve_resume(resume: str | os.PathLike | None, out_dir: str | os.PathLike,
                   warn: Callable[[str], None] = print) -> Path | None:
    """`auto`: the newest checkpoint in out_dir/checkpoints that verifies (None if there is none; each
    unreadable newer one is skipped with a warning naming it); a path: that checkpoint, verified.

    Raises ValueError for a missing or unreadable path, and when `auto` finds checkpoints but none that
    verifies (a fresh start would silently drop the run's progress)."""
    if resume is None:
        return None
    if str(resume) != "auto":
        path = Path(resume)
        if not path.exists():
            raise ValueError(f"--resume: checkpoint {str(path)!r} does not exist")
        try:
            verify_checkpoint(path)
        except CheckpointUnreadable as e:
            raise ValueError(f"--resume: checkpoint {str(path)!r} is unreadable: {e}") from None
        return path
    found = list_checkpoints(checkpoint_dir(out_dir))
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointUnreadable as e:
            warn(f"warning: --resume auto: skipping unreadable checkpoint {path}: {e}")
    if found:
        raise ValueError(f"--resume auto: none of the {len(found)} checkpoint(s) in {checkpoint_dir(out_dir)} "
                         "is readable (see the warnings above); move them away to start afresh")
    return None


# ------------------------------------------------------------------------------------------ reading


def read_trainer_state(path: str | os.PathLike, *, trust_pickle: bool = False,
                       opt_in: str = TRUST_PICKLE) -> dict:
    """The trainer state of checkpoint `path`: trainer.json of a directory, or the whole dict of a
    version-1 file (tensors included: it is one pickle)."""
    path = Path(path)
    if path.is_dir():
        state = _read_json(path / TRAINER_STATE, "the trainer state")
        if state.get("format") != FORMAT or "step" not in state:
            raise CheckpointUnreadable(f"{TRAINER_STATE} is not a {FORMAT} trainer state")
        return state
    state = _load_file(path, trust_pickle, opt_in)
    if "step" not in state:
        raise ValueError(f"{str(path)!r} is not a dinovmf training checkpoint (no 'step' entry)")
    return state


def _load_file(path: Path, trust_pickle: bool, opt_in: str) -> dict:
    state = load_torch_file(path, trust_pickle=trust_pickle, what="checkpoint", opt_in=opt_in)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a dict (got {type(state).__name__})")
    return state


def load_checkpoint(path: str | os.PathLike, parts: tuple[str, ...] = PARTS, *, trust_pickle: bool = False,
                    opt_in: str = TRUST_PICKLE, verify: bool = True) -> dict:
    """Checkpoint `path` (either version) in one process, as full CPU tensors: the trainer state's entries
    (`step`, `config`, `model_args`, ...) plus, for each of `parts`, `student` / `teacher` ({param:
    tensor}), `optimizer` ({"state": {param: {name: tensor}}}), `loss` ({buffer: tensor}) and `rng`
    ({rank: {generator: tensor}}, see `rng_tensors`; a version-1 file holds `rng_state()` dicts).

    A directory is verified first (`verify=False` skips that) and read through DCP, whatever world size
    wrote it. Raises ValueError (`CheckpointUnreadable`, `UnsafeFileError`) naming the file and the
    problem; `trust_pickle` / `opt_in` as in `dinovmf.serialization.load_torch_file`."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file():
        return _load_file(path, trust_pickle, opt_in)
    try:
        if verify:
            verify_checkpoint(path)
        state = read_trainer_state(path)
        tensors = unflatten(read_tensors(path, tuple(f"{part}/" for part in parts)))
    except CheckpointUnreadable as e:
        raise CheckpointUnreadable(f"checkpoint {str(path)!r} is unreadable: {e}") from None
    groups = state.pop("optimizer_param_groups", None)
    if "optimizer" in parts:
        tensors.setdefault("optimizer", {"state": {}})["param_groups"] = groups
    return {**state, **tensors}


def read_tensors(path: str | os.PathLike, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The full tensors of DCP checkpoint `path` whose keys start with one of `prefixes`, in one process."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = read_dcp_metadata(path)
    except UnsafeFileError:
        raise
    except FileNotFoundError:
        raise CheckpointUnreadable(".metadata is missing") from None
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises almost anything
        raise CheckpointUnreadable(f".metadata cannot be read: {e}") from None
    state = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefixes):
            if not isinstance(meta, TensorStorageMetadata):
                raise CheckpointUnreadable(f"entry {key!r} is not a tensor")
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if state:
        dcp_load(state, path, no_dist=True)
    return state


def dcp_load(state: dict[str, torch.Tensor], path: str | os.PathLike, **kwargs) -> None:
    """`torch.distributed.checkpoint.load` of directory `path` into `state` (in place), through the safe
    reader and planner; a damaged file is a `CheckpointUnreadable` naming the rank's error, not DCP's
    CheckpointException (a BaseException carrying every rank's traceback)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=safe_reader(path), planner=safe_load_planner(), **kwargs)
    except CheckpointException as e:
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        unsafe = [c for c in causes if isinstance(c, UnsafeFileError)]
        if unsafe:
            raise unsafe[0] from None
        first = str(causes[0]).strip().splitlines()[0] if causes and str(causes[0]).strip() else repr(causes[:1])
        raise CheckpointUnreadable(f"its tensors cannot be read: {first}") from None


def unflatten(tensors: dict[str, torch.Tensor]) -> dict:
    """The flat checkpoint keys (module docstring) as the nested dicts of version 1."""
    out: dict = {}
    for key, value in tensors.items():
        part, rest = key.split("/", 1)
        if part == "optimizer":
            name, field = rest.rsplit("/", 1)
            out.setdefault("optimizer", {"state": {}})["state"].setdefault(name, {})[field] = value
        elif part == "rng":  # {rank: {generator: tensor}}
            rank, name = rest.split("/", 1)
            out.setdefault("rng", {}).setdefault(int(rank), {})[name] = value
        else:
            out.setdefault(part, {})[rest] = value
    return out


def network_state(path: str | os.PathLike, which: str = "teacher", *, trust_pickle: bool = False,
                  opt_in: str = TRUST_PICKLE) -> tuple[dict[str, torch.Tensor], dict]:
    """(the `which` network's state dict, the trainer state without tensors) of a training checkpoint of
    either version: what export, eval, attention and model.init_from read."""
    if which not in NETWORKS:
        raise ValueError(f"which must be one of {NETWORKS}, got {which!r}")
    state = load_checkpoint(path, (which,), trust_pickle=trust_pickle, opt_in=opt_in)
    if "model_args" not in state or not isinstance(state.get(which), dict) or not state[which]:
        raise ValueError(f"checkpoint {str(path)!r} is not a dinovmf training checkpoint with 'model_args' "
                         f"and '{which}' weights")
    return state[which], {k: v for k, v in state.items() if k not in PARTS}


# ------------------------------------------------------------------------- training state (DCP API)


def training_state(student: torch.nn.Module, teacher: torch.nn.Module,
                   optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(the models' and the optimizer's entries of a checkpoint (module docstring), as this rank holds
    them: DTensor shards under FSDP2, the (replicated) tensors themselves otherwise; the optimizer's
    param groups as JSON, parameters by name). No copy, no collective. Pass the parallelised student
    (`ParallelModels.student`), not a DDP wrapper. The param groups are recorded for inspection
    (`load_checkpoint`'s optimizer.param_groups); a resumed run rebuilds them from its config."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=False)
    stateless = _stateless_parameters(student, optimizer)
    optim = get_optimizer_state_dict(student, optimizer, options=opts)
    optim_state = optim["state"]
    for name, param in stateless.items():  # see _stateless_parameters
        optimizer.state.pop(param, None)
        optim_state.pop(name, None)
    flat = {}
    for part, model in zip(NETWORKS, (student, teacher)):
        flat.update({f"{part}/{k}": v for k, v in get_model_state_dict(model, options=opts).items()})
    for name, entries in optim_state.items():
        for field, value in entries.items():
            flat[f"optimizer/{name}/{field}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (v.item() if torch.is_tensor(v) else list(v) if isinstance(v, tuple) else v)
               for k, v in group.items()} for group in optim["param_groups"]]
    return flat, groups


def restore_training_state(path: str | os.PathLike, student: torch.nn.Module, teacher: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor],
                           process_group=None) -> None:
    """Load checkpoint directory `path` into the parallelised models, their optimizer and the tensors of
    `extra` (flat keys -> tensors to fill in place, e.g. the centers), resharding as needed. Every rank
    calls it (DCP's load is a collective over `process_group`, the default group when None)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    saved = set(read_dcp_metadata(path).state_dict_metadata)
    opts = StateDictOptions(full_state_dict=False)
    models = {part: get_model_state_dict(model, options=opts) for part, model in zip(NETWORKS, (student, teacher))}
    optim = get_optimizer_state_dict(student, optimizer, options=opts)
    target = {f"{part}/{k}": v for part, sd in models.items() for k, v in sd.items()}
    missing = sorted(k for k in target if k not in saved)
    if missing:
        raise CheckpointUnreadable(f"checkpoint {str(path)!r} does not hold this model's {len(missing)} "
                                   f"tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}: was it written "
                                   "for another architecture?")
    # AdamW has no state for a parameter that had no gradient when the checkpoint was written (every
    # prototype during the freeze): request only what was saved, and drop the rest afterwards.
    kept = {}
    for name, entries in optim["state"].items():
        keys = {field: f"optimizer/{name}/{field}" for field in entries}
        if all(k in saved for k in keys.values()):
            kept[name] = entries
            target.update({k: entries[field] for field, k in keys.items()})
    target.update(extra)
    distributed = dist.is_available() and dist.is_initialized()
    dcp_load(target, path, process_group=process_group, no_dist=not distributed)
    for part, model in zip(NETWORKS, (student, teacher)):
        set_model_state_dict(model, models[part], options=opts)
    set_optimizer_state_dict(student, optimizer, {"state": kept, "param_groups": optim["param_groups"]},
                             options=StateDictOptions(full_state_dict=False, strict=False))
    for name, param in student.named_parameters():
        if name not in kept:
            optimizer.state.pop(param, None)


def restore_checkpoint(path: Path, state: dict, student: torch.nn.Module, teacher: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, objective: torch.nn.Module, rank: int,
                       with_rng: bool) -> dict | None:
    """Load checkpoint `path` of either version (`state`: its `read_trainer_state`) into the parallelised
    models, their optimizer and the objective's buffers (the centers); returns rank `rank`'s RNG state
    (for `set_rng_state`) when `with_rng` (the same world size wrote it), else None."""
    if path.is_dir():
        buffers = {f"loss/{k}": v for k, v in objective.state_dict().items()}
        rng = rng_targets(path, rank) if with_rng else {}
        restore_training_state(path, student, teacher, optimizer, {**buffers, **rng})
        objective.load_state_dict({k[len("loss/"):]: v for k, v in buffers.items()})
        return rng_from_tensors({k.rsplit("/", 1)[1]: v for k, v in rng.items()}) if rng else None
    restore_full_training_state(state, student, teacher, optimizer)
    objective.load_state_dict(state["loss"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank that wrote it
    return rngs[rank] if with_rng else None


def rng_targets(path: str | os.PathLike, rank: int) -> dict[str, torch.Tensor]:
    """Empty tensors for rank `rank`'s RNG entries of checkpoint directory `path` (for `restore_training_state`'s
    `extra`; `rng_from_tensors` of them after the load is that rank's RNG state). Empty when it has none."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"rng/{rank}/"
    return {k: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in read_dcp_metadata(path).state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}


def restore_full_training_state(state: dict, student: torch.nn.Module, teacher: torch.nn.Module,
                                optimizer: torch.optim.Optimizer) -> None:
    """Load a version-1 checkpoint's full state dicts (`state`, as `load_checkpoint` returns them) into
    parallelised models and their optimizer. Every rank passes the full dicts; under FSDP2 each keeps
    its own shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, state["student"], options=opts)
    set_model_state_dict(teacher, state["teacher"], options=opts)
    # Not strict: AdamW has no state for a parameter that never had a gradient (see restore_training_state).
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


# ----------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every generator a training step draws from (python, numpy, torch CPU and CUDA), as they give it."""
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


def rng_tensors(state: dict | None = None) -> dict[str, torch.Tensor]:
    """`rng_state()` (default: now) as named tensors, what a checkpoint can hold without pickling."""
    state = rng_state() if state is None else state
    version, words, gauss = state["python"]
    _, keys, pos, has_gauss, cached = state["numpy"]
    out = {"torch": state["torch"].clone(),
           "python": torch.tensor([version, *words], dtype=torch.int64),
           "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
           "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
           "numpy_state": torch.tensor([pos, has_gauss, cached], dtype=torch.float64)}
    for i, s in enumerate(state.get("cuda", [])):
        out[f"cuda{i}"] = s.clone()
    return out


def rng_from_tensors(t: dict[str, torch.Tensor]) -> dict:
    """The inverse of `rng_tensors`: a state `set_rng_state` takes."""
    python = [int(v) for v in t["python"].tolist()]
    has_gauss, gauss = t["python_gauss"].tolist()
    pos, np_has_gauss, cached = t["numpy_state"].tolist()
    state = {"python": (python[0], tuple(python[1:]), gauss if has_gauss else None),
             "numpy": ("MT19937", t["numpy_keys"].numpy().astype(np.uint32), int(pos), int(np_has_gauss), cached),
             "torch": t["torch"].clone()}
    cuda = sorted((k for k in t if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda:
        state["cuda"] = [t[k] for k in cuda]
    return state
