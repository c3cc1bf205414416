"""Process-group set-up: one process, torchrun (one or many nodes) or SLURM srun.

The trainer asks this module for the rank / world size and a device and never touches
`torch.distributed` set-up itself; wrapping the models (DDP / FSDP2 / compile) is `dinovmf.parallelize`.

The store, and restarts (issue #24). torchrun hands its workers the address of a TCPStore that its agent
hosts and keeps for the whole job (`TORCHELASTIC_USE_AGENT_STORE=True`; torch >= 2.4 shares the
rendezvous' store this way), and `init_process_group("env://")` uses that store's keys as they are. After
`--max-restarts` restarts a worker group, the new attempt found the old attempt's keys there: gloo read the
dead processes' addresses and hung in `connectFullMesh` or failed with `Connection refused` (NCCL would
read a stale unique id, pytorch/pytorch#135712). torch's own per-attempt prefix was the agent's restart
count, which is not the same on every node: an agent restarts its workers without counting when another
node's worker failed. So here each attempt's process group lives under a namespace that rank 0 of the
attempt opens and every other rank joins by a handshake that stale keys cannot answer (`_join_attempt`).
Without an agent store (srun, or a launcher whose rank 0 hosts the store) every launch starts a fresh
store and the namespace is fixed.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dinovmf.config import DistConfig

# Seconds a rank may wait for the others (`dist.timeout_s`): collectives time out after it, and the gloo
# watchdog (dinovmf.watchdog) reports a stalled rank before that. torch's own default is 1800 s.
DEFAULT_TIMEOUT_S = DistConfig.timeout_s
# Flight-recorder entries kept per NCCL process group (dumped on a collective timeout).
NCCL_TRACE_ENTRIES = 2000

_CONTROL_GROUP = None  # set by init_distributed under nccl: a gloo group for host-side flags
_STORE_ADDRESS: tuple[str, int, str] | None = None  # (host, port, namespace) of this attempt's keys
_WAITS = 0  # store barriers passed (`wait_all`): each gets its own key


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None     # None when not distributed
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launch(env: dict | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0).

    torchrun (and torch.distributed.run) sets RANK / WORLD_SIZE / LOCAL_RANK plus MASTER_ADDR/PORT.
    Under plain `srun python -m dinovmf.cli train ...` we read SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID; MASTER_ADDR/PORT must then come from the job script (see the README).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def choose_backend(requested: str = "auto") -> str:
    """nccl when CUDA is available, gloo otherwise (`auto`); an explicit choice is checked."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"dist.backend must be auto, nccl or gloo, got {requested!r}")
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("dist.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    return requested


def init_distributed(backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                     trace_dir: str | os.PathLike | None = None) -> DistInfo:
    """Join the process group when launched by torchrun / srun; a no-op for a single process.

    `timeout_s`: how long collectives wait (`dist.timeout_s`). `trace_dir`: where NCCL's flight recorder
    writes its per-rank dumps when a collective times out (default: NCCL's, /tmp).
    """
    rank, world_size, local_rank = detect_launch()
    if world_size == 1:
        return DistInfo(timeout_s=timeout_s)
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError("distributed launch detected (world size "
                           f"{world_size}) but MASTER_ADDR / MASTER_PORT are not set; launch with "
                           "torchrun, or export them in the SLURM script")
    name = choose_backend(backend)
    if name == "nccl":
        torch.cuda.set_device(local_rank)
    global _CONTROL_GROUP, _STORE_ADDRESS
    if not dist.is_initialized():
        faulthandler.enable()  # Python stacks of every thread on a fatal signal (NCCL aborts on a timeout)
        if name == "nccl":
            configure_nccl_watchdog(trace_dir)
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _STORE_ADDRESS = _attempt_store(rank, world_size, timeout)
        dist.init_process_group(name, store=store, rank=rank, world_size=world_size, timeout=timeout)
        # Host-side control flags (stop signals, time limit) travel on a CPU group: an all-reduce of
        # a CUDA tensor would need a device sync to read, every step. Under gloo the default group is one.
        _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout) if name == "nccl" else None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=name, timeout_s=timeout_s)


def configure_nccl_watchdog(trace_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """NCCL's own watchdog and flight recorder, set in the environment before the process group exists
    (ProcessGroupNCCL reads them at construction); a value the user exported wins. Returns what was set.

    A collective that outlives `dist.timeout_s` then tears the process down (`TORCH_NCCL_ASYNC_ERROR_HANDLING`
    3: exit without aborting the communicator, which can itself hang), after dumping the last
    `NCCL_TRACE_ENTRIES` collectives of every rank (`TORCH_FR_BUFFER_SIZE`, `TORCH_NCCL_DUMP_ON_TIMEOUT`) to
    `trace_dir/rank_<r>` (`TORCH_FR_DUMP_TEMP_FILE`; read them with `torchfrtrace`). The names are torch
    2.13's: the flight recorder's were TORCH_NCCL_TRACE_BUFFER_SIZE / TORCH_NCCL_DEBUG_INFO_TEMP_FILE before.
    """
    wanted = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_BUFFER_SIZE": str(NCCL_TRACE_ENTRIES),
              "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        wanted["TORCH_FR_DUMP_TEMP_FILE"] = str(Path(trace_dir) / "rank_")
    applied = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = applied[key] = value
    return applied


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """This attempt's store for the process group, and its (host, port, namespace) (see the module docstring)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    # As torch's env:// rendezvous: torchrun's agent hosts the store, else rank 0 does.
    tcp = dist.TCPStore(host, port, world_size, is_master=rank == 0 and not agent_store, timeout=timeout,
                        multi_tenant=True)
    namespace = "dinovmf/"
    if agent_store:
        attempt = _join_attempt(tcp, rank, world_size, timeout)
        namespace = f"dinovmf/attempt{attempt}/"
        if rank == 0 and attempt > 1:
            print(f"process group: attempt {attempt} in torchrun's store (the workers were restarted)", flush=True)
    return dist.PrefixStore(namespace, tcp), (host, port, namespace)


def _join_attempt(store, rank: int, world_size: int, timeout: datetime.timedelta) -> int:
    """The number of this attempt, the same on every rank, from a store that may hold earlier attempts' keys.

    Rank 0 takes the next number from a counter. Every other rank posts a fresh random token under its rank
    and waits for rank 0 to answer that token with the number, then confirms under the number. Only a live
    rank 0 can answer a token posted after it started, and torchrun starts an attempt only once every
    process of the previous one has ended, so a stale key is never taken for a current one: rank 0 answers
    whatever token it finds under a rank (an old one is answered in vain) until that rank has confirmed.
    """
    if rank != 0:
        token = uuid.uuid4().hex
        store.set(f"dinovmf/hello/{rank}", token)
        attempt = int(store.get(f"dinovmf/welcome/{token}"))  # waits up to the store's timeout
        store.set(f"dinovmf/attempt{attempt}/joined/{rank}", "1")
        return attempt
    attempt = store.add("dinovmf/attempts", 1)
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world_size))
    deadline = time.monotonic() + timeout.total_seconds()
    while waiting:
        for r in sorted(waiting):
            if store.check([f"dinovmf/attempt{attempt}/joined/{r}"]):
                waiting.discard(r)
            elif store.check([f"dinovmf/hello/{r}"]):
                token = store.get(f"dinovmf/hello/{r}")
                if answered.get(r) != token:
                    store.set(f"dinovmf/welcome/{token.decode()}", str(attempt))
                    answered[r] = token
        if waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank(s) {sorted(waiting)} did not join attempt {attempt} of the process "
                                   f"group within {timeout.total_seconds():.0f} s (dist.timeout_s)")
            time.sleep(0.02)
    return attempt


def open_store(timeout_s: float | None = None):
    """A new client of this attempt's store, under its namespace (a thread of its own needs its own
    connection: `dinovmf.watchdog`); None when not distributed."""
    if _STORE_ADDRESS is None:
        return None
    host, port, namespace = _STORE_ADDRESS
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    return dist.PrefixStore(namespace, dist.TCPStore(host, port, is_master=False, timeout=timeout))


def device_for(info: DistInfo) -> torch.device:
    """This process's GPU (by local rank) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def cleanup() -> None:
    global _CONTROL_GROUP, _STORE_ADDRESS
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = _STORE_ADDRESS = None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wait_all(poll_s: float = 0.5) -> None:
    """A barrier without a timeout, for waits whose length is the work of one rank and legitimately long
    (rank 0 preparing a dataset for hours). Every rank must call it the same number of times. A no-op in a
    single process."""
    global _WAITS
    if _STORE_ADDRESS is None:
        return
    _WAITS += 1
    store_barrier(open_store(), f"wait/{_WAITS}", dist.get_world_size(), poll_s)


def store_barrier(store, key: str, world_size: int, poll_s: float = 0.5) -> None:
    """Count this rank in at `key`, then poll the count until all `world_size` ranks are in: `add` never
    waits, so no store or collective timeout applies."""
    store.add(key, 1)
    while store.add(key, 0) < world_size:
        time.sleep(poll_s)


def any_rank(*flags: bool) -> list[bool]:
    """Each of `flags` OR-ed over all ranks (a CPU all-reduce on the control group); as is alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return [bool(v) for v in t.tolist()]


def max_over_ranks(value: float) -> float:
    """The largest of every rank's `value` (a CPU all-reduce on the control group); `value` alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return float(t)
