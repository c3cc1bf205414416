"""`CheckpointWriter`: sharded checkpoints written by every rank, synchronously or in the background.

    writer = CheckpointWriter(out_dir, keep_last, asynchronous=True, rank=r, world_size=w)
    writer.save(step, tensors, trainer_state)  # blocks for the staging copy only, when asynchronous
    writer.failed()                            # this rank's view: did the save in flight fail?
    writer.wait()                              # the save in flight has finished (raises CheckpointError)

What the loop waits for. A synchronous save returns once the checkpoint is on disk. An asynchronous one
waits for the previous save (at most one is in flight), copies this rank's tensors into CPU staging
buffers (kept between saves, pinned on CUDA), and returns: the write runs in a background thread, with
its collectives on a gloo group of its own (as torchtitan does), so they never interleave with the
training step's. Under DDP, where every rank holds the same tensors, each rank stages and writes only
its share of them (balanced by bytes), so no rank holds more than its share plus its staging copy.

How a save ends (every rank the same way): the tensors go through `torch.distributed.checkpoint` into
`.step_N.tmp/`; each rank checksums its own files; rank 0 adds trainer.json and the manifest, fsyncs,
renames the directory to `step_N/` and prunes to `keep_last`. A failure anywhere (a full disk, a rank
that could not write) is one `CheckpointError` on every rank, whose one-line message names the step, the
directory, the cause (for a full disk: the space needed and free) and the newest intact checkpoint; the
temporary directory is removed and the previous checkpoints are untouched.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from dinovmf import checkpoint as ckpt

_RNG_PREFIX = "rng/"  # per-rank entries: always written by their own rank


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous checkpoints are intact (message: one line)."""


class CheckpointWriter:
    """Writes `out_dir/checkpoints/step_N/` (see the module docstring). Every rank constructs one (in the
    same order: it creates a process group when `world_size > 1`) and calls `save` / `wait` at the same
    steps. `keep_last`: checkpoints kept after each save. `asynchronous`: write in a background thread."""

    def __init__(self, out_dir: str | os.PathLike, keep_last: int, *, asynchronous: bool, rank: int = 0,
                 world_size: int = 1):
        import torch.distributed as dist

        self.directory = ckpt.checkpoint_dir(out_dir)
        self.keep_last, self.asynchronous = keep_last, asynchronous
        self.rank, self.world_size = rank, world_size
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self.last_step: int | None = None        # the step of the newest save requested
        self.last_blocked_s = 0.0                 # how long the newest `save` call held the caller
        self.last_total_s: float | None = None    # from `save` to the checkpoint being on disk (None: in flight)
        self._future: Future | None = None
        self._executor: ThreadPoolExecutor | None = None  # the background thread, started by the first async save
        self._staging: dict[str, torch.Tensor] | None = None
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in ckpt.remove_stale_temporaries(self.directory):
                print(f"removed {path}, left by an interrupted checkpoint write", flush=True)
        self._barrier()

    # --------------------------------------------------------------------------------- the loop's side

    def save(self, step: int, tensors: dict[str, torch.Tensor], trainer_state: dict | None) -> None:
        """Checkpoint `step`: `tensors` are this rank's entries (flat keys, see dinovmf.checkpoint; DTensors
        under FSDP2), `trainer_state` the JSON-able trainer state (used on rank 0). Raises CheckpointError
        when this save (synchronous) or the previous one (asynchronous) failed."""
        start = time.perf_counter()
        self.wait()
        share = this_ranks_share(tensors, self.rank, self.world_size)
        self.last_step, self.last_total_s = step, None
        if not self.asynchronous:
            try:
                self._write(step, share, trainer_state, start)
            except BaseException:
                self.last_step = None  # not written: a later save of this step must write it
                raise
            finally:
                self.last_blocked_s = time.perf_counter() - start
            return
        staged = self._stage(share)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinovmf-checkpoint")
        self.last_blocked_s = time.perf_counter() - start
        self._future = self._executor.submit(self._write, step, staged, trainer_state, start)

    def failed(self) -> bool:
        """True when the save in flight has finished with an error (on this rank; every rank's save ends
        the same way, but each finds out when its own thread does)."""
        return self._future is not None and self._future.done() and self._future.exception() is not None

    def wait(self) -> None:
        """Block until no save is in flight; raise its CheckpointError if it failed."""
        future, self._future = self._future, None
        if future is not None and future.exception() is not None:
            self.last_step = None  # not written: a later save of this step must write it
            raise future.exception()

    def close(self) -> None:
        """Wait for the save in flight (raising its error), stop the background thread and free the
        staging buffers."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._staging = None

    # -------------------------------------------------------------------------------------- staging

    def _stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A CPU copy of `tensors` in buffers kept from the last save when the keys and shapes match
        (fresh pages cost a page fault each; on CUDA the buffers are pinned for a fast copy).

        On the CPU each tensor is copied by one thread: a copy is memory-bound, and hundreds of small
        parallel regions cost more in thread wake-ups than they gain (several times slower on a busy
        machine: bench_checkpoint's blocked time)."""
        if self._staging is None or not _same_layout(self._staging, tensors):
            self._staging = None
            self._staging = {key: _staging_buffer(value) for key, value in tensors.items()}
        cuda = any(_local(v).is_cuda for v in tensors.values())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for key, value in tensors.items():
                _local(self._staging[key]).copy_(_local(value), non_blocking=cuda)
        finally:
            torch.set_num_threads(threads)
        if cuda:
            torch.cuda.synchronize()
        return self._staging

    # ---------------------------------------------------------------------------- the write itself

    def _write(self, step: int, tensors: dict[str, torch.Tensor], trainer_state: dict | None,
               start: float) -> Path:
        """Write `tensors` as checkpoint `step` (every rank; in the background thread when asynchronous).
        The collectives run in the same order on every rank whatever fails, so a failure on one rank is
        reported on all and no rank is left waiting."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        tmp = ckpt.temporary_path(self.directory, step)
        error = None
        if self.rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                os.mkdir(tmp)  # mode 0777 & ~umask, as the files DCP writes
            except OSError as e:
                error = e
        local_bytes = sum(_local(v).numel() * _local(v).element_size() for v in tensors.values())
        statuses = self._all_gather((None if error is None else _describe(error), local_bytes))
        needed = sum(b for _, b in statuses)
        if any(s for s, _ in statuses):
            raise CheckpointError(self._message(step, next(s for s, _ in statuses), needed, tmp))
        try:
            writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, thread_count=1)
            dcp.save(tensors, storage_writer=writer, process_group=self.group, no_dist=self.world_size == 1)
        except BaseException as e:  # the same outcome on every rank: DCP gathers the ranks' write results
            raise CheckpointError(self._message(step, e, needed, tmp)) from None
        digests, error = {}, None
        try:
            digests = {p.name: ckpt.file_digest(p) for p in tmp.iterdir() if p.name.startswith(f"__{self.rank}_")}
        except OSError as e:
            error = _describe(e)
        gathered = self._all_gather((digests, error))  # tiny: as cheap as a gather
        result = None
        if self.rank == 0:
            try:
                errors = [e for _, e in gathered if e]
                if errors:
                    raise CheckpointError(errors[0])
                files = {name: d for part, _ in gathered for name, d in part.items()}
                result = str(self._finish(step, tmp, files, trainer_state))
            except BaseException as e:  # noqa: BLE001 - reported to every rank below
                result = CheckpointError(self._message(step, e, needed, tmp))
        result = self._broadcast(result)
        if isinstance(result, BaseException):
            raise result
        self.last_total_s = time.perf_counter() - start
        return Path(result)

    def _finish(self, step: int, tmp: Path, files: dict, trainer_state: dict) -> Path:
        """Rank 0, once every rank's shard is on disk: trainer.json, the manifest, the rename, pruning."""
        ckpt.write_json(tmp / ckpt.TRAINER_STATE, trainer_state)
        for name in (".metadata", ckpt.TRAINER_STATE):
            files[name] = ckpt.file_digest(tmp / name)
        ckpt.write_json(tmp / ckpt.MANIFEST, {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": step,
                                              "world_size": self.world_size, "files": files})
        ckpt.fsync_dir(tmp)
        final = self.directory / ckpt.step_name(step)
        if final.exists():  # the same step again (a resumed run stopped before its first step)
            replaced = ckpt.temporary_path(self.directory, step, "replaced")
            os.replace(final, replaced)
            os.replace(tmp, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(tmp, final)
        ckpt.fsync_dir(self.directory)
        ckpt.prune_checkpoints(self.directory, self.keep_last)
        return final

    def _message(self, step: int, error: BaseException | str, needed: int, tmp: Path) -> str:
        """One line: what failed and what is left. Rank 0 also removes the partial write first (so the
        free space it reports is what a retry would have)."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        intact = ckpt.latest_checkpoint(self.directory)
        keep = (f"the newest intact checkpoint is {intact} (continue with --resume auto)" if intact
                else "no checkpoint of this run was written before")
        cause = error if isinstance(error, str) else _describe(error)
        free = shutil.disk_usage(self.directory).free
        if _is_disk_full(error) or free < needed:
            return (f"checkpoint of step {step} not written: no space left in {self.directory} (it needs about "
                    f"{_size(needed)}, {_size(free)} free); {keep}")
        return f"checkpoint of step {step} not written to {self.directory}: {cause}; {keep}"

    # -------------------------------------------------------------------- collectives (own group)

    def _all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _broadcast(self, obj):
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def this_ranks_share(tensors: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """What `rank` writes of `tensors`: its DTensor shards and its own `rng/` entries, plus a share of the
    replicated tensors (DDP, or the plain tensors beside FSDP2's), assigned greedily by bytes, largest
    first, to the least loaded rank. Every rank computes the same assignment: the keys and shapes of
    replicated tensors are the same everywhere."""
    if world_size == 1:
        return tensors
    from torch.distributed.tensor import DTensor

    load = [0] * world_size
    share = {}
    replicated = [k for k, v in tensors.items() if not isinstance(v, DTensor) and not k.startswith(_RNG_PREFIX)]
    for key in sorted(replicated, key=lambda k: (-tensors[k].numel() * tensors[k].element_size(), k)):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += tensors[key].numel() * tensors[key].element_size()
        if owner == rank:
            share[key] = tensors[key]
    replicated = set(replicated)
    share.update({k: v for k, v in tensors.items() if k not in replicated})
    return share


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _staging_buffer(t: torch.Tensor) -> torch.Tensor:
    """An empty CPU tensor shaped like `t` (pinned when `t` is on CUDA); for a DTensor, a DTensor with
    `t`'s sharding around it, so DCP writes it as `t`'s shard. (torch's `_create_cpu_state_dict` deep-copies
    a CPU DTensor first, and ~45% of the copies stayed resident: bench_checkpoint, FSDP2.)"""
    from torch.distributed.tensor import DTensor

    local = _local(t)
    buffer = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
    return DTensor(buffer, t._spec, requires_grad=False) if isinstance(t, DTensor) else buffer


def _same_layout(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_local(a[k]).shape == _local(b[k]).shape and a[k].dtype == b[k].dtype
                                        for k in a)


def _causes(error: BaseException):
    """`error`, its causes and contexts, and (DCP's CheckpointException) the failures of every rank."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in getattr(e, "failures", {}).values():  # (exception, traceback summary) per rank
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def _is_disk_full(error: BaseException | str) -> bool:
    if isinstance(error, str):
        return "No space left" in error or "Disk quota" in error
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _causes(error))


def _describe(error: BaseException) -> str:
    """The most specific one-line description: the innermost OSError if any, else the error's first line."""
    for e in _causes(error):
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"

