"""Why a training loop stops early: a signal (SIGTERM / SIGUSR1 / SIGUSR2 from a scheduler pre-empting the
job, SIGINT from a user), a wall-clock budget, or a non-finite loss. The first two end the run cleanly
(checkpoint saved); the last raises. The exit codes of `dinovmf train` say which (`EXIT_*`).

Each is a local flag OR-ed over the ranks (`dinovmf.distributed.any_rank`: one tiny all-reduce on a CPU
group, no GPU sync; free in a single process), so every rank stops at the same step and no rank is left
waiting in a collective that the others abandoned.
"""
from __future__ import annotations

import math
import signal
import time

import torch

from dinovmf import distributed as D

# Exit codes of `dinovmf train` beyond 0 (done), 1 (stopped on a non-finite loss, or crashed) and 2 (bad input).
EXIT_PREEMPTED = 75   # SIGTERM / SIGUSR1 / SIGUSR2: saved; continue with --resume auto (sysexits' EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): saved, as a shell reports an interrupted command
EXIT_HUNG = 3         # the watchdog found ranks that stopped making progress (dinovmf.watchdog)
# Signals that stop the run after the current step: a scheduler's warning (SLURM's --signal=USR1@120 or
# SIGTERM at the time limit) or Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf at `step` (counted as the logs count: the n-th step is step n); the run
    stopped without saving over the last good checkpoint."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class NonFiniteLossGuard:
    """Checks one scalar per step, the loss, and raises `NonFiniteLossError` naming its step.

    No pass over a full tensor: the loss is one number, and every non-finite gradient or activation
    reaches it within a step. When to read it is the choice that matters:

    * CPU: the loss is already computed when it is read (CPU ops are synchronous), so `check` reads it at
      once, before backward: the weights never see the bad step.
    * CUDA (`deferred`): reading it right away (`.item()`) would stall the host until the GPU had finished
      the forward, emptying the launch queue every step. Instead the loss is copied, non-blocking, into
      pinned host memory behind an event; the check of step n waits on that event at step n + 1, after
      step n + 1's forward is queued, by which time the copy has long landed, so the host stays about a
      step ahead of the GPU and never drains it. The price is that step n's optimizer update has already
      applied the bad gradients in memory; `flush()` (called before every checkpoint and log) raises first,
      so no checkpoint ever holds them and the last good one is kept.

    `check(..., watch={name: 0-d tensor})` reads other scalars of the step in the same copy (the entropies
    the collapse detector follows every step): `latest` holds the last values read, with their step.
    """

    def __init__(self, device: torch.device, deferred: bool | None = None):
        cuda = device.type == "cuda"
        self.deferred = cuda if deferred is None else deferred
        self._pin = cuda
        self._host = torch.empty(1, dtype=torch.float32, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._pending: tuple[int, list[str]] | None = None
        self.latest: dict | None = None  # {"step": n, "loss": ..., **watch} of the last step read

    def check(self, loss: torch.Tensor, step: int, watch: dict[str, torch.Tensor] | None = None) -> None:
        names = list(watch or {})
        values = loss.detach().reshape(1).float()
        if names:
            values = torch.cat([values, torch.stack([watch[k].detach().reshape(()).float() for k in names])])
        if not self.deferred:
            self._read(values.tolist(), step, names)
            return
        self.flush()  # the previous step's values; the buffer is free again afterwards
        if self._host.numel() != values.numel():
            self._host = torch.empty(values.numel(), dtype=torch.float32, pin_memory=self._pin)
        self._host.copy_(values, non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._pending = (step, names)

    def flush(self) -> None:
        """Check the loss still in flight (deferred mode); a no-op when there is none."""
        if self._pending is None:
            return
        if self._event is not None:
            self._event.synchronize()
        (step, names), self._pending = self._pending, None
        self._read(self._host.tolist(), step, names)

    def _read(self, values: list[float], step: int, names: list[str]) -> None:
        self.latest = {"step": step, "loss": values[0], **dict(zip(names, values[1:]))}
        self._raise_unless_finite(values[0], step)

    @staticmethod
    def _raise_unless_finite(value: float, step: int) -> None:
        """Raise on every rank when any rank's loss is not finite (a rank raising alone would leave the
        others blocked in the step's gradient all-reduce)."""
        local = not math.isfinite(value)
        if D.any_rank(local)[0]:
            where = f"({value})" if local else "(on another rank)"
            raise NonFiniteLossError(
                f"non-finite loss {where} at step {step}; stopping. Try a lower optim.lr, a smaller "
                "optim.clip_grad, or train.amp=none, and run with train.probes=true to see which layer "
                "blows up", step)


class StopSignal:
    """Turns `STOP_SIGNALS` into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    @property
    def received_locally(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """What `dinovmf train` exits with after stopping on the received signal."""
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_PREEMPTED

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TimeLimit:
    """A wall-clock budget for training (e.g. a demo that must finish in minutes, or a job slot)."""

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes

    def expired_locally(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline
