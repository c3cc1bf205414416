"""What each process fault costs a run: steps redone and seconds to detect / to train again (issue #24).

Each fault is caused for real on 2-process CPU runs of the tests' tiny config (gloo), as the fault suite
causes it (tests/test_faults.py), and timed from the fault:

- `sigkill_restart`: rank 1 SIGKILLed under `torchrun --standalone --max-restarts 1`; detection is
  torchrun noticing the dead worker; `seconds_to_train` runs to the first step the restarted attempt logs;
  steps redone = steps logged before the kill minus the checkpoint resumed from.
- `sigstop_hang`: rank 1 SIGSTOPped (two processes as srun starts them); detection is rank 0's watchdog
  exiting, for each `dist.timeout_s` in `--timeouts`; the steps since the last checkpoint are lost.
- `sigusr1_preempt`: SIGUSR1 to `torchrun --signals-to-handle ...,SIGUSR1` (SLURM's --signal=USR1@120
  reaching the agents): seconds until the run has saved and exited; nothing is redone on resume.
- `lr_1e4_collapse`: the demo preset at optim.lr=1e4 (PIL loader): steps from the first step whose loss
  sits at ln K to the collapse warning, and whether the warning came before the NaN stop.

Rows go to bench/results/faults.csv (+ .png: seconds to detect against dist.timeout_s) with the commit
and the load average; the README's reliability table is read from there.

    python -m bench.bench_faults [--timeouts 10,20,40] [--faults sigkill_restart,...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _launch_utils import free_port, kill_all, launch, logged, torchrun_worker, wait_for_step, wait_until  # noqa: E402
from _train_utils import tiny_config, write_image_folder  # noqa: E402

from bench.bench_step import git_commit  # noqa: E402
from bench.harness import record  # noqa: E402
from dinovmf import checkpoint as ckpt  # noqa: E402
from dinovmf.config import dump_yaml  # noqa: E402
from dinovmf.stopping import EXIT_HUNG  # noqa: E402

STEPS = 40
CKPT_EVERY = 4
RUN = [f"steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.keep_last=10"]
TIMEOUT_S = 600  # every launch, every wait


def train_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "dinovmf.cli", "train", "--config", str(config), "--out", str(out), "--resume", "auto",
            *RUN, *extra]


def sigkill_restart(config: Path, base: Path, kill_step: int = 10) -> dict:
    out = base / "sigkill"
    proc = launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
                   *train_args(config, out)], cwd=ROOT)
    wait_for_step(out, kill_step, [proc], TIMEOUT_S)
    os.kill(torchrun_worker([proc.pid], 1), signal.SIGKILL)
    killed, killed_wall = time.monotonic(), time.time()
    records_before = len(logged(out))
    before = max(r["step"] for r in logged(out))
    wait_until(lambda: len(logged(out)) > records_before, [proc], TIMEOUT_S, "the restarted attempt's first step")
    trains_again = time.monotonic() - killed
    log = proc.communicate(timeout=TIMEOUT_S)[0]
    resumed = int(log.split("resumed from step ")[1].split()[0])
    return {"fault": "sigkill_restart", "dist_timeout_s": 600, "steps_redone": before - resumed,
            "seconds_to_detect": round(agent_noticed(log, "failed (exitcode: -9)") - killed_wall, 2),
            "seconds_to_train": round(trains_again, 1), "finished": proc.returncode == 0,
            "note": f"killed after step {before}, resumed from {resumed}"}


def agent_noticed(log: str, text: str) -> float:
    """The wall time of torchrun's first log line holding `text` (its lines start `E1206 02:46:21.168000`)."""
    line = next(line for line in log.splitlines() if text in line)
    stamp = datetime.datetime.strptime(f"{datetime.date.today().year} {line[1:21]}", "%Y %m%d %H:%M:%S.%f")
    return stamp.timestamp()


def sigstop_hang(config: Path, base: Path, timeout_s: int, stop_step: int = 6) -> dict:
    out = base / f"sigstop{timeout_s}"
    port = free_port()
    procs = [launch(train_args(config, out, "steps=100000", f"dist.timeout_s={timeout_s}"), cwd=ROOT,
                    RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port)) for rank in (0, 1)]
    wait_for_step(out, stop_step, procs, TIMEOUT_S)
    os.kill(procs[1].pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        log = procs[0].communicate(timeout=4 * timeout_s)[0]
        detected = time.monotonic() - stopped
    finally:
        kill_all(procs)
    last = max(r["step"] for r in logged(out))
    named = "rank 1 (at step" in log and procs[0].returncode == EXIT_HUNG
    return {"fault": "sigstop_hang", "dist_timeout_s": timeout_s, "steps_redone": last % CKPT_EVERY,
            "seconds_to_detect": round(detected, 1), "seconds_to_train": float("nan"), "finished": False,
            "note": f"exit {procs[0].returncode}, rank 1 named: {named}"}


def sigusr1_preempt(config: Path, base: Path, signal_step: int = 10) -> dict:
    out = base / "sigusr1"
    proc = launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1,SIGUSR2", *train_args(config, out)], cwd=ROOT)
    wait_for_step(out, signal_step, [proc], TIMEOUT_S)
    os.kill(proc.pid, signal.SIGUSR1)
    signalled = time.monotonic()
    log = proc.communicate(timeout=TIMEOUT_S)[0]
    stopped = time.monotonic() - signalled
    last = max(r["step"] for r in logged(out))
    saved = ckpt.list_checkpoints(out / "checkpoints")[-1][0]
    return {"fault": "sigusr1_preempt", "dist_timeout_s": 600, "steps_redone": last - saved,
            "seconds_to_detect": round(stopped, 1), "seconds_to_train": float("nan"),  # saved and exited
            "finished": False, "note": f"saved step {saved}; workers: 'stopped by signal' "
                                       f"{'yes' if 'stopped by signal' in log else 'no'}"}


def lr_collapse(base: Path) -> dict:
    out = base / "lr1e4"
    proc = launch(["-m", "dinovmf.cli", "train", "--config", "demo", "--out", str(out), "data.val=null", "steps=60",
                   "optim.lr=1e4", "train.log_every=1", "data.loader=pil", "data.num_workers=0"], cwd=ROOT)
    proc.communicate(timeout=TIMEOUT_S)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    log_k = math.log(256)
    at_ln_k = [r["step"] for r in records if r["kind"] == "train" and abs(r["loss"] - log_k) < 1e-3]
    warned = [r["step"] for r in records if r["kind"] == "warning" and r.get("warning") == "collapse"]
    nan = [r["step"] for r in records if r["kind"] == "error"]
    return {"fault": "lr_1e4_collapse", "dist_timeout_s": float("nan"),
            "steps_redone": float("nan"), "seconds_to_detect": float("nan"), "seconds_to_train": float("nan"),
            "finished": False, "note": f"loss at ln K from step {at_ln_k[0] if at_ln_k else None}, warning at "
                                       f"{warned[0] if warned else None}, NaN at {nan[0] if nan else None}"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeouts", default="10,20,40", help="dist.timeout_s values for the hang")
    parser.add_argument("--faults", default="sigkill_restart,sigstop_hang,sigusr1_preempt,lr_1e4_collapse")
    args = parser.parse_args(argv)
    faults = args.faults.split(",")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        data = write_image_folder(base / "train", "train", 16)  # 160 images: 10 steps per epoch per rank
        config = base / "tiny.yaml"
        config.write_text(dump_yaml(tiny_config(data, None)))
        rows = []
        if "sigkill_restart" in faults:
            rows.append(sigkill_restart(config, base))
        if "sigstop_hang" in faults:
            rows += [sigstop_hang(config, base, int(t)) for t in args.timeouts.split(",")]
        if "sigusr1_preempt" in faults:
            rows.append(sigusr1_preempt(config, base))
        if "lr_1e4_collapse" in faults:
            rows.append(lr_collapse(base))
    stamp = {"commit": git_commit(), "load": f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"}
    record("faults", [{**r, **stamp} for r in rows], x="dist_timeout_s", y="seconds_to_detect", group="fault",
           title="seconds from the fault to its detection (2 gloo processes, tiny config)", logx=True)


if __name__ == "__main__":
    main()
