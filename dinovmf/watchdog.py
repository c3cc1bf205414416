"""A stalled rank, named: a heartbeat in the process group's store, for gloo runs (issue #24).

When one rank stops (SIGSTOP, a hung file system, a deadlock in a data thread), the others wait in their
next collective until its timeout and then fail with a message that names no one; before this module a
stopped rank left the run waiting for the full 1800 s with no message at all. Here every rank's
`ProgressWatchdog` thread writes a heartbeat into the store when the loop moves (at most every
`MIN_BEAT_S`, so the step it carries is current) and at least every `poll_s` seconds: a counter (it stops
when the process is stopped or holds the GIL), the loop's progress (a count of the loop points passed)
and the step. When this rank has made no progress for `patience_s`, the thread reads every rank's
heartbeat twice, three beat periods apart:

* ranks whose counter did not move are **silent** (stopped, or gone);
* ranks whose progress is below the most advanced rank's are **behind** (alive, stuck outside the
  collective the others wait in: data loading, a deadlock);

and when there is either it prints which ranks, at which step, and this rank's Python stacks
(faulthandler), then exits with `EXIT_HUNG` so that torchrun's `--max-restarts` or a requeue takes over.
When every rank is alive and level it does not fire: that is long work every rank is doing (the first
step's compilation, a checkpoint every rank is writing), which the
collective's own timeout bounds.

It covers `Trainer.fit`'s loop (checkpoints included) and nothing else: data preparation on rank 0 waits
in a store barrier without a timeout (`distributed.wait_all`), the final kNN runs on rank 0 alone after
the loop. Store traffic is one small write per rank per step (at most 1 / `MIN_BEAT_S` a second) or per
`poll_s`, plus one read of every heartbeat by a rank that has stalled. NCCL runs use NCCL's own watchdog and flight recorder instead
(`distributed.configure_nccl_watchdog`).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

from dinovmf.stopping import EXIT_HUNG

# The watchdog fires after this fraction of `dist.timeout_s` without progress, so that its report (about 4
# polls of patience / 20 later) comes before the collective's own timeout error, which names no rank.
PATIENCE_FRACTION = 0.6
MIN_BEAT_S = 0.1  # the shortest time between two heartbeats of a rank: 10 store writes a second at most


def _key(rank: int) -> str:
    return f"heartbeat/{rank}"


class ProgressWatchdog:
    """`start()` / `stop()` (or `with`) around a loop that calls `progress(step)` at each of its points.

    `store`: a store every rank shares (`distributed.open_store()`: a connection of the thread's own).
    `exit`: what ends the process (tests pass a recorder); `stream`: where the report goes.
    """

    def __init__(self, store, rank: int, world_size: int, patience_s: float, poll_s: float | None = None,
                 stream=None, exit=os._exit):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.patience_s = patience_s
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.1, patience_s / 20))
        self.stream = sys.stderr if stream is None else stream
        self._exit = exit
        self._points, self._step = 0, 0
        self._last_progress = time.monotonic()
        self._beats = 0
        self._stop = threading.Event()
        self._moved = threading.Event()  # set by progress(): beat now, with the new step
        self._thread = threading.Thread(target=self._run, name="dinovmf-watchdog", daemon=True)
        self.report: str | None = None  # the text printed when it fired

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        self._beat()  # before the first step: a rank that never gets here is silent from the start
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._moved.set()  # wake the thread now, not at its next poll
        if self._thread.is_alive():
            self._thread.join()

    def progress(self, step: int) -> None:
        """A point of the loop was passed (a batch arrived, a step ended); `step`: steps done. Cheap: no I/O."""
        self._points += 1
        self._step = step
        self._last_progress = time.monotonic()
        self._moved.set()

    # ------------------------------------------------------------------------------- the thread

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(_key(self.rank), f"{self._beats} {self._points} {self._step}")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._moved.wait(self.poll_s)
                self._moved.clear()
                self._beat()
                if self._stop.wait(MIN_BEAT_S):  # at most one beat per MIN_BEAT_S
                    return
                stalled = time.monotonic() - self._last_progress
                if stalled < self.patience_s:
                    continue
                silent, behind, snapshot = self._diagnose()
                if silent or behind:
                    self._fire(stalled, silent, behind, snapshot)
                    return
                self._last_progress = time.monotonic()  # everyone alive and level: look again later
        except Exception as e:  # noqa: BLE001 - the store is gone (its host died): that is a hang too
            if not self._stop.is_set():
                self._fire(time.monotonic() - self._last_progress, [], [], {}, store_error=e)

    def _read_all(self) -> dict[int, tuple[int, int, int] | None]:
        out = {}
        for r in range(self.world_size):
            key = _key(r)
            out[r] = tuple(int(v) for v in self.store.get(key).split()) if self.store.check([key]) else None
        return out

    def _diagnose(self):
        """(silent ranks, behind ranks, {rank: (beats, points, step)}) from two readings three beat periods
        apart (a live rank beats at least every `poll_s + MIN_BEAT_S`; three leave a margin for a busy machine)."""
        first = self._read_all()
        for _ in range(3):
            if self._stop.wait(self.poll_s + MIN_BEAT_S):  # the loop ended meanwhile: nothing to report
                return [], [], {}
            self._beat()
        last = self._read_all()
        silent = [r for r in range(self.world_size)
                  if last[r] is None or (first[r] is not None and last[r][0] == first[r][0])]
        alive = {r: v for r, v in last.items() if r not in silent}
        ahead = max((v[1] for v in alive.values()), default=0)
        behind = [r for r, v in alive.items() if v[1] < ahead]
        return silent, behind, last

    def _fire(self, stalled: float, silent: list[int], behind: list[int], snapshot: dict, store_error=None):
        def where(r):
            v = snapshot.get(r)
            return f"rank {r} (never started)" if v is None else f"rank {r} (at step {v[2]})"

        lines = [f"dinovmf watchdog, rank {self.rank}: no progress for {stalled:.3g} s at step {self._step} "
                 f"(patience {self.patience_s:.3g} s = {PATIENCE_FRACTION} x dist.timeout_s)."]
        if silent:
            lines.append("Silent (no heartbeat: stopped, hung holding the GIL, or gone): "
                         + ", ".join(where(r) for r in silent) + ".")
        if behind:
            lines.append("Behind (alive, but stuck before the collective the others wait in): "
                         + ", ".join(where(r) for r in behind) + ".")
        if store_error is not None:
            lines.append(f"The process group's store is unreachable ({store_error}): the process hosting "
                         "it (torchrun's agent, or rank 0) is gone.")
        lines.append(f"Python stacks of rank {self.rank} follow; exiting with code {EXIT_HUNG} so that "
                     "torchrun --max-restarts or a requeued job takes over (resume with --resume auto).")
        self.report = "\n".join(lines)
        print(self.report, file=self.stream, flush=True)
        try:
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
        except (AttributeError, ValueError, OSError):  # a stream without a file descriptor (tests)
            pass
        self.stream.flush()
        self._exit(EXIT_HUNG)


class NoWatchdog:
    """What `watchdog_for` gives where there is nothing to watch (one process) or NCCL watches itself."""

    report = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def progress(self, step: int) -> None:
        pass


def watchdog_for(info) -> ProgressWatchdog | NoWatchdog:
    """The loop's watchdog for this rank (`info`: a `distributed.DistInfo`): a heartbeat for a gloo run of
    several processes, patience `PATIENCE_FRACTION x dist.timeout_s`; nothing otherwise."""
    from dinovmf import distributed as D

    store = D.open_store(info.timeout_s) if info.is_distributed and info.backend == "gloo" else None
    if store is None:
        return NoWatchdog()
    return ProgressWatchdog(store, info.rank, info.world_size, PATIENCE_FRACTION * info.timeout_s)
