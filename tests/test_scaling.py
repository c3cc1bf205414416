"""Two gloo ranks (one launch): DDP's knobs train exactly like the defaults, the bytes each step hands to
collectives are what the sizing model predicts (DDP and FSDP2), a slow loader on one rank shows up as
communication on the other and as a data-wait warning naming the loader, and bench_scaling's measurement
runs on two ranks. Plus the benchmark's refusal to oversubscribe the cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _train_utils import read_records, write_image_folder
from test_distributed import torchrun, wait_all

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BASE = ["optim.warmup_epochs=0", "optim.freeze_last_layer=1"]  # 2 steps per epoch below: frozen for 2 steps
KNOBS = {"default": [], "knobs": ["dist.bucket_cap_mb=0.01", "dist.gradient_as_bucket_view=true",
                                  "dist.static_graph=true"]}
SLOW_S = 0.6  # rank 1's loader sleeps this long per batch

WORKER = f"""
import json, sys, time
from pathlib import Path
import torch
sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]
from _train_utils import HookedLoader, tiny_config
from bench.bench_scaling import measure
from dinovmf import plan as P
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.distributed import cleanup, init_distributed
from dinovmf.train import build_train_loader
from dinovmf.trainer import Trainer

out, data = Path(sys.argv[1]), sys.argv[2]
info = init_distributed("gloo")
result = {{}}

def steps(extra, n):
    cfg = tiny_config(data, None, {BASE!r} + extra)
    trainer = Trainer(cfg, None, steps_per_epoch=2)
    v0 = trainer.models.student.head.v.detach().clone()
    losses, frozen = [], []
    for step in range(n):
        crops = synthetic_crops(cfg.crops, cfg.train.batch_size, seed=10 * step + info.rank)
        losses.append(float(trainer.train_step(crops, step)["loss"]))
        frozen.append(torch.equal(trainer.models.student.head.v, v0))
    return {{"losses": losses, "frozen": frozen, **trainer.timing.read(),
            "predicted_bytes": P.comm_bytes_per_step(P.model_size(cfg), trainer.models.fsdp)}}

for name, knobs in {KNOBS!r}.items():
    result[name] = steps(knobs, 4)
result["fsdp"] = steps(["dist.fsdp=true"], 2)

cfg = tiny_config(data, None, {BASE!r} + ["steps=6", "train.log_every=3"])
loader = build_train_loader(cfg, out / "straggler", info)
slow = lambda i, crops: (time.sleep({SLOW_S}) if info.rank == 1 else None) or crops
Trainer(cfg, out / "straggler", steps_per_epoch=len(loader)).fit(HookedLoader(loader, slow))

result["bench"] = measure(tiny_config(data, None, {BASE!r}), steps=2, warmup=1, blocks=1)
(out / f"rank{{info.rank}}.json").write_text(json.dumps(result))
cleanup()  # every process group (DDP's, the checkpoint writer's) destroyed before the interpreter exits
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    base = tmp_path_factory.mktemp("scaling")
    worker = base / "worker.py"
    worker.write_text(WORKER)
    data = write_image_folder(base / "train", "train", 4)
    out = base / "out"
    out.mkdir()
    wait_all([torchrun(["--standalone", "--nproc_per_node", "2"], worker, out, data, [])], timeout=600)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_knobs_train_exactly_like_the_defaults(ranks):
    """bucket_cap_mb, gradient_as_bucket_view and static_graph change how gradients travel, not the run: the
    same losses step for step, prototypes frozen through the freeze (their gradients dropped after backward,
    which static_graph and bucket views must survive) and training after it."""
    _, (r0, r1) = ranks
    for r in (r0, r1):
        assert r["knobs"]["losses"] == r["default"]["losses"]
        assert r["knobs"]["frozen"] == r["default"]["frozen"] == [True, True, False, False]
    assert len(set(r0["default"]["losses"])) > 1  # the losses move, so the comparison can fail


@pytest.mark.parametrize("run", ["default", "knobs", "fsdp"])
def test_bytes_per_step_are_what_the_sizing_model_predicts(ranks, run):
    _, (r0, _) = ranks
    measured, predicted = r0[run]["step_comm_bytes"], sum(r0[run]["predicted_bytes"].values())
    print(f"{run}: measured {measured:.0f} B per step, predicted {predicted:.0f} B")
    assert measured == predicted
    assert 0 <= r0[run]["time_share/comm"] < 1  # measured (NaN would mean the instrumentation is missing)


def test_a_slow_loader_on_one_rank_is_communication_on_the_other_and_warns(ranks):
    """Rank 0 (the one that logs) waits for rank 1 in the first collective of each step (the center's
    all-reduce): that wait is communication, rank 1's sleep is its data wait (`data_max`), and the warning
    names the loader. Checked on the second window: the first holds DDP's one-time bucket rebuild, a
    collective inside its forward at the second step."""
    out, _ = ranks
    records = read_records(out / "straggler")
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        print({k: round(v, 3) for k, v in r.items() if k.startswith("time_share/")}, r["step_time_s"])
    r = records[-1]
    waited = r["time_share/comm"] * r["step_time_s"]  # per step
    assert 0.7 * SLOW_S < waited
    assert r["time_share/data_max"] * r["step_time_s"] > SLOW_S  # rank 1's sleep
    assert abs(sum(v for k, v in r.items() if k.startswith("time_share/") and k != "time_share/data_max") - 1) < 1e-6
    warnings = [r for r in read_records(out / "straggler", kind="warning") if r["warning"] == "data_wait"]
    assert len(warnings) == 1 and "waited for data" in warnings[0]["message"]
    assert "data.num_workers=0" in warnings[0]["message"] and "data.loader=pil" in warnings[0]["message"]


def test_bench_scaling_measures_two_ranks(ranks):
    _, (r0, r1) = ranks
    row = r0["bench"]
    assert r1["bench"] is None  # rank 0 reports
    assert row["world_size"] == 2 and row["backend"] == "gloo"
    assert row["comm_bytes_per_step"] == row["predicted_comm_bytes_per_step"] > 0
    assert row["img_s_global"] == pytest.approx(2 * row["img_s_per_rank"])
    for key in ("nosync_step_ms", "bus_gbps", "predicted_exposed_comm_ms", "predicted_efficiency"):
        assert row[key] > 0, key
    assert 0 < row["predicted_efficiency"] <= 1 and row["predicted_efficiency_serial"] <= row["predicted_efficiency"]


def test_bench_scaling_refuses_more_ranks_x_threads_than_cores(tmp_path):
    """Said before anything starts: the worker exits before importing torch or joining a process group."""
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(cores + 1)}
    done = subprocess.run([sys.executable, "-m", "bench.bench_scaling", "--worker", "--threads", "1"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"{cores + 1} rank(s) x 1 thread(s) need {cores + 1} CPU cores" in done.stderr
    assert "Traceback" not in done.stderr
