"""Where the step's time goes (dinovmf.step_timing): the phases partition a window, communication inside a
phase is taken out of it, DDP's last bucket hand-off opens the exposed communication; and in a real run
the log line, metrics.jsonl and the data-wait warning, with a loader that really is slow and a checkpoint
written every step."""
import io
import math
import time

import pytest
from _train_utils import fit, read_records, tiny_config, write_image_folder

from dinovmf import step_timing
from dinovmf.monitor import Monitor
from dinovmf.step_timing import SHARE_PREFIX, DataWaitCheck, StepTiming


class Clock:
    """A host clock the test moves by hand (marks and the window both read it)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(step_timing.time, "perf_counter", clock)
    return clock


def shares(timing: StepTiming) -> dict:
    return {k[len(SHARE_PREFIX):]: v for k, v in timing.read().items() if k.startswith(SHARE_PREFIX)}


def test_phases_partition_the_window_and_comm_is_taken_out_of_its_phase(clock):
    timing = StepTiming("cpu", distributed=True)
    batches = iter(["a", "b"])

    def slow_batches():
        for b in batches:
            clock.advance(1.0)  # the loader's wait
            yield b
    for _ in timing.timed_iter("data", slow_batches()):
        timing.begin("forward")
        clock.advance(2.0)
        with timing.comm():  # e.g. the center's all-reduce wait, inside the forward
            clock.advance(0.5)
        timing.begin("backward")
        clock.advance(3.0)
        timing.begin("optimizer")
        clock.advance(1.0)
        timing.end()
    with timing.phase("checkpoint"):
        clock.advance(2.0)
    clock.advance(1.0)  # logging: no phase
    got = shares(timing)
    wall = 2 * (1 + 2.5 + 3 + 1) + 2 + 1
    assert got == pytest.approx({"data": 2 / wall, "forward": 4 / wall, "comm": 1 / wall, "backward": 6 / wall,
                                 "optimizer": 2 / wall, "checkpoint": 2 / wall, "other": 1 / wall})
    assert math.isnan(timing.read()["step_comm_bytes"])  # a new, empty window: no steps


def test_ddp_exposed_comm_runs_from_the_last_bucket_hand_off_to_the_end_of_backward(clock):
    timing = StepTiming("cpu", distributed=True)
    timing.begin("backward")
    clock.advance(1.0)
    timing.handed_off(400)  # first bucket: its all-reduce overlaps the rest of the backward
    clock.advance(2.0)
    timing.handed_off(600)  # the last bucket: the backward's compute ends here
    clock.advance(0.5)      # DDP waits for the all-reduces
    timing.begin("optimizer")
    clock.advance(0.5)
    timing.end()
    record = timing.read()
    assert record[f"{SHARE_PREFIX}comm"] == pytest.approx(0.5 / 4)
    assert record[f"{SHARE_PREFIX}backward"] == pytest.approx(3.0 / 4)
    assert record["step_comm_bytes"] == 1000  # one optimizer step


def test_one_process_reports_no_comm_and_missing_instrumentation_reports_nan(clock):
    single = StepTiming("cpu", distributed=False)
    single.begin("forward")
    clock.advance(1.0)
    single.end()
    assert f"{SHARE_PREFIX}comm" not in single.read()
    broken = StepTiming("cpu", distributed=True)
    broken.comm_measured = False  # what instrument_communication sets when FSDP2's methods are not there
    broken.begin("forward")
    clock.advance(1.0)
    broken.end()
    assert math.isnan(broken.read()[f"{SHARE_PREFIX}comm"])


def test_the_end_of_an_epoch_is_data_wait_and_closes_the_phase(clock):
    timing = StepTiming("cpu")

    def epoch():
        clock.advance(1.0)
        yield "batch"
        clock.advance(2.0)  # the loader finds the end of its epoch
    assert list(timing.timed_iter("data", epoch())) == ["batch"]
    clock.advance(1.0)  # after the epoch: no phase is open any more
    assert shares(timing) == pytest.approx({"data": 0.75, "forward": 0, "backward": 0, "optimizer": 0,
                                            "checkpoint": 0, "other": 0.25})


def test_the_log_line_shows_data_comm_and_checkpoint_shares(tmp_path):
    out = io.StringIO()
    monitor = Monitor(tmp_path, 10, tensorboard=False, progress="lines", stream=out)
    monitor.log(5, {"loss": 1.0, f"{SHARE_PREFIX}data": 0.031, f"{SHARE_PREFIX}comm": 0.08,
                    f"{SHARE_PREFIX}checkpoint": 0.0})
    monitor.log(10, {"loss": 1.0, f"{SHARE_PREFIX}data": 0.5, f"{SHARE_PREFIX}checkpoint": 0.2})
    monitor.close()
    first, second = out.getvalue().splitlines()
    assert "| data 3% | comm 8% |" in first and "ckpt" not in first
    assert "| data 50% | ckpt 20% |" in second


def test_the_data_wait_warning_comes_once_and_names_the_loader_settings():
    cfg = tiny_config("unused")
    check = DataWaitCheck(cfg, loader=None)
    assert check.check(10, 0.05) is None
    text = check.check(20, 0.4)
    assert "40%" in text and "step 20" in text
    for setting in ("data.loader=pil", "data.num_workers=0", "train.batch_size=8", "crops 2x32+2x16"):
        assert setting in text
    assert check.check(30, 0.9) is None  # once per run


def test_a_slow_loader_and_checkpoints_show_in_the_run_log(tmp_path):
    """A real run whose loader sleeps before every batch and which checkpoints every step: the log
    attributes at least the sleep to data, time to checkpoints, and warns once about the loader."""
    sleep_s = 0.3
    data = write_image_folder(tmp_path / "train", "train", 2)
    cfg = tiny_config(data, None, ["steps=4", "train.log_every=2", "train.ckpt_every=1"])

    def slow(i, crops):
        time.sleep(sleep_s)
        return crops
    fit(cfg, tmp_path / "run", slow)
    records = read_records(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        window = r["window_s"]
        assert r[f"{SHARE_PREFIX}data"] * window >= 2 * sleep_s  # two batches per window, each slept
        assert r[f"{SHARE_PREFIX}checkpoint"] > 0
        assert f"{SHARE_PREFIX}comm" not in r  # one process
        assert sum(v for k, v in r.items() if k.startswith(SHARE_PREFIX) and k != f"{SHARE_PREFIX}data_max") \
            == pytest.approx(1.0)
        # the monitor's window and the timing's are the same window
        assert window == pytest.approx(2 * r["step_time_s"], rel=0.05)
    warnings = [r for r in read_records(tmp_path / "run", kind="warning") if r["warning"] == "data_wait"]
    assert len(warnings) == 1 and "waited for data" in warnings[0]["message"]


def test_a_loop_that_never_logs_keeps_a_bounded_record(clock):
    """train_step in a user's own loop, without fit's log steps: intervals are folded into sums as they
    pile up (on CUDA that reads their events), and the eventual read is still exact."""
    timing = StepTiming("cpu")
    for _ in range(step_timing.MAX_PENDING_INTERVALS + 10):
        timing.begin("forward")
        clock.advance(1.0)
        timing.begin("backward")
        clock.advance(3.0)
        timing.end()
        assert len(timing._intervals) < step_timing.MAX_PENDING_INTERVALS
    assert shares(timing) == pytest.approx({"data": 0, "forward": 0.25, "backward": 0.75, "optimizer": 0,
                                            "checkpoint": 0, "other": 0})
