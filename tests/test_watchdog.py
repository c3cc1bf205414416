"""`ProgressWatchdog` (dinovmf/watchdog.py) on an in-memory store, ranks as threads of one process:
it fires naming a silent rank (frozen heartbeat) or a rank that is behind, never when every rank is alive
and level, and exits with EXIT_HUNG. The real fault (a SIGSTOPped process) is in test_faults.py."""
import io
import time

import pytest
import torch.distributed as dist

from dinovmf.stopping import EXIT_HUNG
from dinovmf.watchdog import NoWatchdog, ProgressWatchdog, watchdog_for


class Rank:
    """One rank's watchdog, whose exit is recorded instead of ending the process."""

    def __init__(self, store, rank: int, world_size: int = 2, patience_s: float = 0.5):
        self.exits, self.stream = [], io.StringIO()
        self.dog = ProgressWatchdog(store, rank, world_size, patience_s, poll_s=0.05, stream=self.stream,
                                    exit=self.exits.append)

    def wait_exit(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.exits and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.exits == [EXIT_HUNG], self.stream.getvalue()
        return self.stream.getvalue()


@pytest.fixture
def store():
    return dist.HashStore()


def test_a_rank_whose_heartbeat_stops_is_named_silent_with_its_step(store):
    r0, r1 = Rank(store, 0), Rank(store, 1)
    with r0.dog, r1.dog:
        for step in range(4):
            r0.dog.progress(step)
            r1.dog.progress(step)
        time.sleep(0.2)  # a few beats carry the step (every poll_s)
        r1.dog.stop()  # as SIGSTOP does: its thread no longer beats
        started = time.monotonic()
        report = r0.wait_exit()
    assert time.monotonic() - started < 0.5 + 1.0  # patience + diagnosis (4 polls) + slack
    assert "Silent" in report and "rank 1 (at step 3)" in report and "no progress" in report
    assert r1.exits == []


def test_a_rank_that_never_started_is_named(store):
    r0 = Rank(store, 0)
    with r0.dog:
        report = r0.wait_exit()
    assert "rank 1 (never started)" in report


def test_a_live_rank_behind_the_others_is_named_behind(store):
    """Rank 1 is alive (its thread beats) but stuck before the step rank 0 waits in (e.g. in its data)."""
    r0, r1 = Rank(store, 0), Rank(store, 1, patience_s=60)
    with r0.dog, r1.dog:
        for step in range(3):
            r0.dog.progress(step)
            r1.dog.progress(step)
        r0.dog.progress(3)  # rank 0 got its batch and entered step 3; rank 1 did not
        report = r0.wait_exit()
    assert "Behind" in report and "rank 1 (at step 2)" in report and "Silent" not in report


def test_alive_and_level_ranks_do_not_fire(store):
    """Every rank waiting at the same point and beating: long work all ranks do (a first step that compiles,
    rank 0 writing a checkpoint while the others wait): the collective's timeout bounds it, not the watchdog."""
    r0, r1 = Rank(store, 0, patience_s=0.3), Rank(store, 1, patience_s=0.3)
    with r0.dog, r1.dog:
        r0.dog.progress(1)
        r1.dog.progress(1)
        time.sleep(1.5)  # 5 patiences
    assert r0.exits == r1.exits == []


def test_the_store_barrier_outlasts_the_store_timeout(store):
    """Data preparation on rank 0 may take hours: the others wait in `store_barrier`, which polls and so is
    bound by no timeout (here 20x the store's own)."""
    import threading
    from datetime import timedelta

    from dinovmf.distributed import store_barrier

    store.set_timeout(timedelta(seconds=0.05))
    late = threading.Thread(target=lambda: (time.sleep(1.0), store_barrier(store, "prep", 2, 0.01)))
    started = time.monotonic()
    late.start()
    store_barrier(store, "prep", 2, 0.01)  # rank 0 arrives 1 s late
    waited = time.monotonic() - started
    late.join()
    assert waited >= 0.95 and int(store.add("prep", 0)) == 2


def test_nothing_to_watch_in_one_process():
    from dinovmf.distributed import DistInfo
    assert isinstance(watchdog_for(DistInfo()), NoWatchdog)
    assert isinstance(watchdog_for(DistInfo(rank=0, world_size=8, backend="nccl")), NoWatchdog)  # NCCL's own
