"""Where a step's time goes, per log window: data wait, forward, backward, optimizer + EMA, communication
not hidden behind compute, checkpoint writing (docs/DESIGN.md §3, "Where a run's time goes").

    timing = StepTiming(device)
    instrument_communication(models, objective, timing)  # after parallelize: DDP hook, FSDP2 groups, centers
    for batch in timing.timed_iter("data", batches): # the loader's wait
        timing.begin("forward"); ...; timing.begin("backward"); ...; timing.begin("optimizer"); ...
        timing.end()
        with timing.phase("checkpoint"): save()
    shares = timing.read()                           # on log steps only: {"time_share/data": ..., ...}

Clocks. On the CPU every mark is `time.perf_counter()`. On CUDA a mark is an event recorded on the current
stream, so an interval is what the GPU's stream did between the two host calls: a loader wait while the
GPU still works through queued steps records (almost) nothing, which is right, because it cost nothing;
events are read on log steps only (`read`), so timing adds no host sync to ordinary steps.

Communication not hidden behind compute:
- DDP: a comm hook (`DistributedDataParallel.register_comm_hook`, the public API) runs the standard
  all-reduce and marks when each bucket is handed to it. Buckets are handed over in order as their
  gradients become ready, so the last mark is the end of the backward compute; everything from there to
  the end of `loss.backward()` (DDP waits for every bucket there) is communication the backward did not
  hide. Earlier buckets overlap the backward and count as compute. The hook also counts the bytes reduced.
- FSDP2: the time the compute stream (on the CPU: the training thread) spends inside FSDP2's all-gather
  and reduce-scatter entry points of each parameter group (`unshard`, `wait_for_unshard`, `post_backward`,
  `finalize_backward`), plus the bytes gathered and reduce-scattered. These are private FSDP2 methods
  (torch 2.13); if they are missing, communication is reported as not measured (NaN), never as zero.
- The wait for the teacher center's all-reduce (`centering.TeacherCenter.comm_timer`) and the per-step
  stop-flag all-reduce (`timing.comm()` around it). The first collective of a step is where every rank waits
  for the slowest one, so a straggler shows up as communication on the other ranks. (Sinkhorn centering's
  all-reduces are not instrumented: their waits count in the forward.)
A comm interval inside a phase is subtracted from that phase, so the shares add up to the window.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Iterable, Iterator

import torch

PHASES = ("data", "forward", "backward", "optimizer", "comm", "checkpoint")
SHARE_PREFIX = "time_share/"
DATA_WAIT_WARN_SHARE = 0.10  # warn once when the loader's wait exceeds this share of a window
# Intervals kept unread before they are folded into sums (on CUDA that reads the events: one sync per this
# many intervals, for loops that call train_step without ever logging).
MAX_PENDING_INTERVALS = 4096
# FSDP2's per-parameter-group methods that communicate or wait for communication (torch 2.13).
FSDP_COMM_METHODS = ("unshard", "wait_for_unshard", "post_backward", "finalize_backward")


class _HostClock:
    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def sync(self) -> None:
        pass


class _CudaClock:
    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3

    def sync(self) -> None:
        torch.cuda.synchronize()


class StepTiming:
    """Accumulates phase intervals (see the module docstring) and turns them into shares of the window.

    Phases do not nest (`begin` closes the open one); communication intervals may fall inside a phase
    and are subtracted from it. `distributed=False` (one process): no comm share is reported.
    `comm_measured` is False when the instrumentation could not be attached (the comm share is then NaN).
    """

    def __init__(self, device: torch.device | str = "cpu", distributed: bool = False):
        device = torch.device(device)
        self.distributed = distributed  # a single process has no communication to report
        self.clock = _CudaClock() if device.type == "cuda" else _HostClock()
        self._intervals: list[tuple[str, object, object, str | None]] = []  # (phase, start, end, inside)
        self._seconds = dict.fromkeys(PHASES, 0.0)  # folded intervals of this window
        self._open: tuple[str, object] | None = None
        self._handed_off = None   # mark of the latest DDP bucket handed to the all-reduce, this backward
        self._comm_depth = 0
        self.comm_measured = True
        self.comm_bytes = 0       # bytes handed to collectives since the last read
        self._steps = 0           # optimizer phases closed since the last read
        self._window_start = time.perf_counter()

    # ---------------------------------------------------------------------------------------- phases

    def begin(self, phase: str) -> None:
        """Close the open phase (if any) and open `phase`."""
        if phase not in PHASES or phase == "comm":
            raise ValueError(f"phase must be one of {[p for p in PHASES if p != 'comm']}, got {phase!r}")
        mark = self.clock.mark()
        self._close(mark)
        self._open = (phase, mark)

    def end(self) -> None:
        """Close the open phase."""
        self._close(self.clock.mark())

    def _close(self, mark) -> None:
        if self._open is None:
            return
        phase, start = self._open
        self._add(phase, start, mark, None)
        if self._handed_off is not None:  # DDP: from the last bucket's hand-off to the end of this phase
            self._add("comm", self._handed_off, mark, phase)
            self._handed_off = None
        if phase == "optimizer":
            self._steps += 1
        self._open = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """`with timing.phase("checkpoint"): ...`: the block as one phase (closing any open one)."""
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def timed_iter(self, phase: str, iterable: Iterable) -> Iterator:
        """Yield from `iterable`, timing each `next()` as `phase` (the loader's wait: "data")."""
        iterator = iter(iterable)
        while True:
            self.begin(phase)
            try:
                item = next(iterator)
            except StopIteration:  # finding the end of an epoch is waiting for the loader too
                return
            finally:
                self.end()
            yield item

    # ---------------------------------------------------------------------------------- communication

    @contextlib.contextmanager
    def comm(self):
        """Time the block as communication, inside whatever phase is open (nested blocks count once). Its
        bytes, if it counts them, go to `comm_bytes`."""
        if self._comm_depth:
            yield
            return
        self._comm_depth += 1
        start = self.clock.mark()
        try:
            yield
        finally:
            self._comm_depth -= 1
            self._add("comm", start, self.clock.mark(), self._open[0] if self._open else None)

    def handed_off(self, nbytes: int) -> None:
        """A DDP bucket of `nbytes` was handed to the all-reduce now (see the module docstring)."""
        self.comm_bytes += nbytes
        self._handed_off = self.clock.mark()

    # ---------------------------------------------------------------------------------------- reading

    def _add(self, phase: str, start, end, inside: str | None) -> None:
        self._intervals.append((phase, start, end, inside))
        if len(self._intervals) >= MAX_PENDING_INTERVALS:
            self._fold()

    def _fold(self) -> None:
        """Turn the recorded intervals into seconds per phase (on CUDA: waits for their events)."""
        if self._intervals:
            self.clock.sync()
        for phase, start, end, inside in self._intervals:
            dt = self.clock.seconds(start, end)
            self._seconds[phase] += dt
            if inside is not None:
                self._seconds[inside] -= dt
        self._intervals.clear()

    def reset(self) -> None:
        """Start a new window now, dropping what was recorded (a loop starting after set-up)."""
        self._intervals.clear()
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._open, self._handed_off = None, None
        self._steps, self.comm_bytes = 0, 0
        self._window_start = time.perf_counter()

    def read(self) -> dict[str, float]:
        """The window since the last read, then reset: `time_share/<phase>` (fractions of the window's wall
        time; `other` is what no phase covered: logging, Python between phases), `step_comm_bytes` (bytes
        handed to collectives per optimizer step) and `window_s`. On CUDA this waits for the last event:
        call it on log steps only."""
        now = time.perf_counter()
        wall, self._window_start = now - self._window_start, now
        self._fold()
        seconds, self._seconds = self._seconds, dict.fromkeys(PHASES, 0.0)
        steps, self._steps = self._steps, 0
        nbytes, self.comm_bytes = self.comm_bytes, 0
        out = {f"{SHARE_PREFIX}{p}": max(0.0, s) / wall if wall > 0 else math.nan for p, s in seconds.items()}
        if not self.distributed:
            del out[f"{SHARE_PREFIX}comm"]
        elif not self.comm_measured:
            out[f"{SHARE_PREFIX}comm"] = math.nan
        out[f"{SHARE_PREFIX}other"] = max(0.0, 1.0 - sum(v for v in out.values() if math.isfinite(v)))
        if self.distributed:
            out["step_comm_bytes"] = nbytes / steps if steps else math.nan
        out["window_s"] = wall
        return out


# -------------------------------------------------------------------------------- instrumentation

def instrument_communication(models, objective: torch.nn.Module, timing: StepTiming) -> None:
    """Attach the comm measurement to the parallelised models (a `dinovmf.parallelize.ParallelModels`):
    the DDP comm hook, or wrappers around FSDP2's parameter-group methods; and to the objective's centers
    (`centering.TeacherCenter.comm_timer`: the wait for their statistic's all-reduce). One process: nothing."""
    from torch.nn.parallel import DistributedDataParallel

    if not timing.distributed:
        return
    for module in objective.modules():
        if hasattr(module, "comm_timer"):
            module.comm_timer = timing.comm
    if isinstance(models.student_forward, DistributedDataParallel):
        models.student_forward.register_comm_hook(timing, timed_allreduce_hook)
    elif models.fsdp:
        if not all(_instrument_fsdp(model, timing) for model in (models.student, models.teacher)):
            timing.comm_measured = False


def timed_allreduce_hook(timing: StepTiming, bucket):
    """DDP comm hook: mark the hand-off and bytes of `bucket`, then DDP's standard all-reduce (mean); returns
    its Future. (Unannotated: DDP checks the annotation against the class, which this module's postponed
    annotations would turn into a string.)"""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    timing.handed_off(buffer.numel() * buffer.element_size())
    return allreduce_hook(None, bucket)


def _instrument_fsdp(model: torch.nn.Module, timing: StepTiming) -> bool:
    """Wrap every FSDP2 parameter group's communicating methods in `model`; False if the private API that
    exposes them is not there (another torch)."""
    groups = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is not None:
            groups += getattr(get_state(), "_fsdp_param_groups", None) or []
    needed = FSDP_COMM_METHODS + ("fsdp_params", "comm_ctx", "_all_gather_result")
    if not groups or not all(hasattr(g, m) for g in groups for m in needed):
        return False
    for group in groups:
        for name in FSDP_COMM_METHODS:
            setattr(group, name, _timed_fsdp_method(group, name, getattr(group, name), timing))
    return True


def _timed_fsdp_method(group, name: str, method, timing: StepTiming):
    """`method` of an FSDP2 parameter group, timed as communication, with the bytes of the all-gather
    (`unshard`, when it starts one) or the reduce-scatter (`post_backward`, when it reduces gradients) it
    issues: each parameter's full size in the dtype it travels in (`dinovmf.plan` predicts the same)."""
    @functools.wraps(method)
    def timed(*args, **kwargs):
        gathering = name == "unshard" and group._all_gather_result is None
        states = getattr(group.comm_ctx, "reduce_scatter_states", None) if name == "post_backward" else None
        last_reduce = states[-1] if states else None
        with timing.comm():
            out = method(*args, **kwargs)
        result = group._all_gather_result
        if gathering and result is not None and result.param_all_gather_input_numels:  # world 1: no gather
            timing.comm_bytes += sum(p._orig_size.numel() * _itemsize(p.param_dtype or p.orig_dtype)
                                     for p in group.fsdp_params)
        elif states and states[-1] is not last_reduce:  # post_backward issued a reduce-scatter
            timing.comm_bytes += sum(p._orig_size.numel() * _itemsize(p.reduce_dtype or p.orig_dtype)
                                     for p in group.fsdp_params if p.sharded_param.requires_grad)
        return out
    return timed


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------ data wait

class DataWaitCheck:
    """Warns once per run when the loader's wait exceeds `DATA_WAIT_WARN_SHARE` of a log window, naming the
    loader's settings and what to change."""

    def __init__(self, cfg, loader, threshold: float = DATA_WAIT_WARN_SHARE):
        self.cfg, self.loader, self.threshold = cfg, loader, threshold
        self.warned = False
        self.windows = 0

    def check(self, step: int, share: float) -> str | None:
        """The warning for a log window whose data-wait share is `share`, or None. The run's first window
        never warns: it holds the loader's start-up (worker processes, the first epoch's compilation, the
        first batch's latency), which no loader setting shortens."""
        from dinovmf.data.loader import default_num_workers

        self.windows += 1
        if self.warned or self.windows == 1 or not share > self.threshold:
            return None
        self.warned = True
        cfg = self.cfg
        describe = getattr(self.loader, "describe", None)
        loader = describe() if describe is not None else type(self.loader).__name__
        return (f"the training waited for data {share:.0%} of the time (the most of any rank) up to step {step} "
                f"(more than {self.threshold:.0%}): the loader does not keep up. Loader: {loader}; data.loader="
                f"{cfg.data.loader}, data.num_workers={cfg.data.num_workers}, train.batch_size="
                f"{cfg.train.batch_size}, crops 2x{cfg.crops.global_size}+{cfg.crops.n_local}x"
                f"{cfg.crops.local_size}; {default_num_workers()} CPU core(s) per rank on this node. To change: "
                f"raise data.num_workers up to this rank's cores, read a .beton with data.loader=ffcv "
                f"(dinovmf prepare; --max-resolution 512 makes smaller JPEGs), or give each GPU more CPU cores "
                f"(dinovmf plan prints how many a run needs)")
