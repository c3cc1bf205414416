"""Telemetry and stopping: progress as lines off a terminal and as a bar on one, the ETA, the non-finite
loss guard in both of its modes, the stop conditions."""
import io
import math

import pytest
import torch

from dinovmf.monitor import Monitor, format_duration, read_metrics
from dinovmf.stopping import NonFiniteLossError, NonFiniteLossGuard, TimeLimit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_monitor(tmp_path, stream, total=20, log_every=5, progress="auto") -> Monitor:
    monitor = Monitor(tmp_path, total, images_per_step=8, flops_per_image=1e9, peak=1e12, tensorboard=False,
                      progress=progress, stream=stream)
    monitor.message("dinovmf train: header")
    for step in range(1, total + 1):
        monitor.advance()
        if step % log_every == 0:
            monitor.log(step, {"loss": 5.0 - step / 10, "lr": 1e-3, **monitor.throughput(step)})
    monitor.close()
    return monitor


def test_progress_is_one_line_per_logged_step_when_not_a_terminal(tmp_path):
    out = io.StringIO()  # a file, a pipe, CI: isatty() is False
    monitor = run_monitor(tmp_path, out)
    assert monitor.progress == "lines"
    text = out.getvalue()
    assert "\r" not in text  # no carriage-return redraws in a log file
    lines = text.splitlines()
    assert lines[0] == "dinovmf train: header"
    assert [line.split(" | ")[0] for line in lines[1:]] == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]
    for line in lines[1:]:
        step, loss, speed, mfu, eta = line.split(" | ")
        assert loss.startswith("loss ") and speed.endswith(" img/s") and mfu.startswith("MFU ")
        assert eta.startswith("ETA ")
    assert lines[1].split(" | ")[1] == "loss 4.5000"
    assert lines[-1].endswith("ETA 0s")  # nothing left at the last step
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10, 15, 20]


def test_progress_is_a_bar_on_a_terminal(tmp_path):
    out = Terminal()
    monitor = run_monitor(tmp_path, out)
    assert monitor.progress == "bar"
    text = out.getvalue()
    assert "\r" in text and "20/20" in text and "dinovmf train: header" in text
    assert "step 5/20 |" not in text  # the bar replaces the lines
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 4


def test_eta_from_the_mean_step_time(tmp_path, monkeypatch):
    clock = iter([100.0, 130.0])  # created at t=100, asked at t=130 after 10 of 40 steps (from step 0)
    monkeypatch.setattr("dinovmf.monitor.time.perf_counter", lambda: next(clock))
    monitor = Monitor(tmp_path, 40, tensorboard=False, progress="none", enabled=False)
    assert monitor.eta_s(10) == pytest.approx(90.0)  # 30 steps left at 3 s/step
    assert [format_duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
    with pytest.raises(ValueError, match="progress"):
        Monitor(tmp_path, 1, progress="fancy", enabled=False)


def test_loss_guard_checks_at_once_on_cpu():
    guard = NonFiniteLossGuard(torch.device("cpu"))
    assert not guard.deferred
    guard.check(torch.tensor(1.5, requires_grad=True), 0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(inf\) at step 7"):
        guard.check(torch.tensor(math.inf), 7)


def test_deferred_loss_guard_reports_a_step_when_the_next_one_is_checked_or_flushed():
    """The GPU mode's bookkeeping (run on the CPU here): step n's value is read at step n + 1 or at a flush,
    and the error names step n."""
    guard = NonFiniteLossGuard(torch.device("cpu"), deferred=True)
    guard.check(torch.tensor(2.0), 0)
    guard.check(torch.tensor(float("nan")), 1)  # not read yet
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        guard.check(torch.tensor(2.0), 2)
    guard = NonFiniteLossGuard(torch.device("cpu"), deferred=True)
    guard.check(torch.tensor(float("nan")), 4)
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        guard.flush()  # as before a checkpoint: never save the weights of a bad step
    guard.flush()  # nothing in flight: a no-op


def test_time_limit():
    assert not TimeLimit(None).expired_locally()
    assert TimeLimit(1e-9).expired_locally() and not TimeLimit(60).expired_locally()
