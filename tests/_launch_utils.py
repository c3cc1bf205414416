"""Launching real training processes and causing faults in them (tests/test_faults.py, bench/bench_faults.py).

Every process is started in a session of its own, so `kill_all` ends it with its children (torchrun's
workers included); every wait has a deadline.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from _train_utils import read_records


def launch(args: list[str], cwd: str | Path | None = None, **env: str) -> subprocess.Popen:
    """`python *args` with one intra-op thread per process, output captured (stdout and stderr together)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=cwd)


def kill_all(procs: list[subprocess.Popen]) -> list[str]:
    """SIGKILL what is left of `procs` and of their sessions, reap them; the output each had not yet given."""
    outputs = []
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if p.stdout is not None and not p.stdout.closed:
            outputs.append(p.communicate()[0] or "")
        else:
            p.wait()
            outputs.append("")
    return outputs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process; their outputs. At the deadline all are killed and the error shows their output."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(0.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        tails = [out[-3000:] for out in outputs + kill_all(procs)[len(outputs):]]
        raise AssertionError(f"still running after {timeout} s:\n" + "\n----\n".join(tails)) from None
    finally:
        kill_all(procs)
    return outputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(out: Path) -> list[dict]:
    """The train records of out/metrics.jsonl so far ([] before the file exists)."""
    return read_records(out) if (out / "metrics.jsonl").exists() else []


def wait_until(condition, procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    """Poll `condition()` every 10 ms; raise (killing `procs`) when a process ends first or at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = any(p.poll() is not None for p in procs)
        if ended or time.monotonic() > deadline:
            why = "a process ended" if ended else f"{timeout} s passed"
            tails = [out[-3000:] for out in kill_all(procs)]
            raise AssertionError(f"{why} before {what}:\n" + "\n----\n".join(tails))
        time.sleep(0.01)


def wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> int:
    """Block until out/metrics.jsonl logs a step >= `step`; returns the newest logged step."""
    wait_until(lambda: any(r["step"] >= step for r in logged(out)), procs, timeout, f"step {step} was logged")
    return max(r["step"] for r in logged(out))


def torchrun_worker(root_pids: list[int], rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` among the descendants of `root_pids`."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    todo, found = list(root_pids), []
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in env):
                found.append(child)
    assert len(found) == 1, f"expected one worker with RANK={rank} under {root_pids}, found {found}"
    return found[0]
