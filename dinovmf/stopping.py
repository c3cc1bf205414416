"""Why a training loop stops early: a signal (SIGTERM / SIGINT, e.g. a pre-empted job), a wall-clock budget,
or a non-finite loss. The first two end the run cleanly (checkpoint saved); the last raises.

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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; the run stopped without saving over the last good checkpoint."""


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
    """

    def __init__(self, device: torch.device, deferred: bool | None = None):
        cuda = device.type == "cuda"
        self.deferred = cuda if deferred is None else deferred
        self._host = torch.empty((), dtype=torch.float32, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._pending: int | None = None

    def check(self, loss: torch.Tensor, step: int) -> None:
        if not self.deferred:
            self._raise_unless_finite(float(loss.detach()), step)
            return
        self.flush()  # the previous step's value; its buffer is free again afterwards
        self._host.copy_(loss.detach(), non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._pending = step

    def flush(self) -> None:
        """Check the loss still in flight (deferred mode); a no-op when there is none."""
        if self._pending is None:
            return
        if self._event is not None:
            self._event.synchronize()
        step, self._pending = self._pending, None
        self._raise_unless_finite(self._host.item(), step)

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
                "blows up")


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    @property
    def received_locally(self) -> bool:
        return self.received is not None

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
