"""Benchmark: weak scaling of the training step across ranks and nodes, with where each step's time goes.

    python -m bench.bench_scaling                                   # here: torchrun 1 and 2 ranks, alternating
    python -m bench.bench_scaling --world-sizes 1 2 --threads 1 --models demo vit_s16 --batch 8 2
    torchrun --nnodes 4 --nproc_per_node 8 ... -m bench.bench_scaling --worker --models vit_b16 --batch 32

Every rank runs `Trainer.train_step` (the training step itself, DDP or FSDP2 as `dist.fsdp` says) at the
same per-rank batch on synthetic crops, or on a `.beton` through the real loader (`--data`), timed by the
trainer's own `dinovmf.step_timing` (data wait, forward, backward, optimizer, communication not hidden
behind compute). Measured blocks of steps alternate:

- synced: the real step; per-rank and global images/s and the breakdown;
- no_sync (DDP only): the same step without the gradient all-reduce (`DistributedDataParallel.no_sync`), so
  the difference is the communication the step did not hide, measured a second way.

The sizing model predicts each multi-rank row (`dinovmf.plan.exposed_comm_seconds`) from the compute
measured here (the no_sync steps under DDP; the synced steps minus their communication under FSDP2) and the
all-reduce bus bandwidth measured here: `predicted_efficiency` with its overlap assumptions,
`predicted_efficiency_serial` with none (every collective exposed).

The driver (no `--worker`) launches `torchrun --standalone` for each world size in turn, round after round,
and records per world size: global images/s, weak-scaling efficiency against the one-rank run of the same
round (images/s at N ranks / (N x images/s at one rank)), the breakdown, the bytes each step hands to
collectives against `dinovmf.plan.comm_bytes_per_step`, and the predicted efficiency: bench/results/
scaling.csv, and scaling.png (efficiency measured and predicted; the breakdown). On a cluster, run the
worker under torchrun once at one GPU and once at N: each launch records its own rows, and the efficiency
is computed against the newest one-rank row of the same configuration and device in the CSV.

Cores: a launch needs ranks x threads CPU cores on each machine (more would time the scheduler, not the
step); it says so before it starts.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Presets of the benchmark: name -> (config preset, overrides). "demo": the CPU demo's ViT (4-block
# ViT-Tiny/8, 32 px crops, K=256); vit_s16 / vit_b16: the ImageNet presets.
MODELS = {"demo": ("demo", []), "vit_s16": ("vit_s16_in1k", ["train.compile=false"]),
          "vit_b16": ("vit_b16_in1k", []), "vit_l16": ("vit_l16_in1k", [])}
# Parallelism and DDP's knobs (the `dist.*` config keys) to compare; one process runs plain "ddp" only.
MODES = {"ddp": ["dist.fsdp=false"], "fsdp": ["dist.fsdp=true"],
         "ddp_bucket1": ["dist.fsdp=false", "dist.bucket_cap_mb=1"],
         "ddp_view": ["dist.fsdp=false", "dist.gradient_as_bucket_view=true"],
         "ddp_static": ["dist.fsdp=false", "dist.static_graph=true"],
         "ddp_view_static": ["dist.fsdp=false", "dist.gradient_as_bucket_view=true", "dist.static_graph=true"]}
NAME = "scaling"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_cores(ranks_here: int, threads: int, cores: int | None = None) -> None:
    """Refuse a launch whose ranks x threads exceed this machine's cores (SystemExit naming both)."""
    cores = available_cores() if cores is None else cores
    if ranks_here * threads > cores:
        raise SystemExit(f"bench_scaling: {ranks_here} rank(s) x {threads} thread(s) need {ranks_here * threads} "
                         f"CPU cores on this machine, which has {cores}: fewer ranks per node or --threads "
                         f"{max(1, cores // ranks_here)} (an oversubscribed box times the scheduler, not the step)")


def bench_config(model: str, mode: str, batch: int, extra: list[str]):
    from dinovmf.config import load_config

    preset, overrides = MODELS[model]
    return load_config(preset, overrides + MODES[mode] + [f"train.batch_size={batch}", "steps=1000000",
                                                           "optim.freeze_last_layer=0", "data.val=null"] + extra)


# ------------------------------------------------------------------------------------------ worker

def _batches(cfg, data: str, info, device):
    """An endless stream of crops: the same synthetic batch (per rank), or the loader's batches of `data`."""
    from dinovmf.data.synthetic import synthetic_crops

    if data == "synthetic":
        crops = synthetic_crops(cfg.crops, cfg.train.batch_size, device, seed=info.rank)
        while True:
            yield crops
    from dinovmf.data import MultiCropLoader

    loader = MultiCropLoader(data, cfg.train.batch_size, cfg.crops, device, augment=cfg.augment, seed=cfg.train.seed,
                             rank=info.rank, world_size=info.world_size, num_workers=cfg.data.num_workers,
                             backend=cfg.data.loader)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for crops, _ in loader:
            yield crops
        epoch += 1


def _block(trainer, batches, steps: int, start: int, no_sync: bool) -> dict:
    """`steps` training steps from step `start`; their wall time per step and the trainer's breakdown."""
    import contextlib

    import torch

    from dinovmf import distributed as D

    D.barrier()
    trainer.timing.reset()
    ddp = trainer.models.student_forward
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    context = ddp.no_sync() if no_sync else contextlib.nullcontext()
    t0 = time.perf_counter()
    with context:
        for i, crops in zip(range(steps), trainer.timing.timed_iter("data", batches)):
            trainer.train_step(crops, start + i)
    sync()
    seconds = time.perf_counter() - t0
    return {"step_s": seconds / steps, **trainer.timing.read()}


def allreduce_bus_gbps(nbytes: int = 16 * 2 ** 20, reps: int = 5) -> float:
    """Bus bandwidth of this process group's all-reduce (nccl-tests' busbw: 2 (N-1)/N x bytes / time), GB/s."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    x = torch.ones(nbytes // 4, device=device)
    dist.all_reduce(x)  # warm-up (connections, buffers)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * (world - 1) / world * nbytes / statistics.median(times) / 1e9


def measure(cfg, steps: int, warmup: int, blocks: int, data: str = "synthetic") -> dict | None:
    """Run the benchmark's measurement in this process (one rank of a torchrun job, or alone): returns the
    result dict on rank 0, None elsewhere."""
    import torch
    import torch.distributed as dist

    from dinovmf import plan as P
    from dinovmf.monitor import mfu, peak_flops
    from dinovmf.trainer import Trainer

    trainer = Trainer(cfg, None, steps_per_epoch=1000)
    info, fsdp = trainer.info, trainer.models.fsdp
    batches = _batches(cfg, data, info, trainer.device)
    step = 0
    for _ in range(warmup):
        trainer.train_step(next(batches), step)
        step += 1
    synced, unsynced = [], []
    compare = info.is_distributed and not fsdp  # no_sync: DDP's way to skip the all-reduce
    for _ in range(blocks):
        synced.append(_block(trainer, batches, steps, step, no_sync=False))
        step += steps
        if compare:
            unsynced.append(_block(trainer, batches, steps, step, no_sync=True))
            step += steps
    bus_gbps = allreduce_bus_gbps() if info.is_distributed else math.nan

    def median(rows, key):
        values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        return statistics.median(values) if values else math.nan

    mine = {"step_s": median(synced, "step_s"), "nosync_step_s": median(unsynced, "step_s"),
            **{k: median(synced, k) for k in synced[0] if k.startswith("time_share/") or k == "step_comm_bytes"},
            **{f"nosync_{k}": median(unsynced, k) for k in ("time_share/forward", "time_share/backward")}}
    ranks = [mine]
    if info.is_distributed:
        ranks = [None] * info.world_size
        dist.all_gather_object(ranks, mine)
    if not info.is_main:
        return None
    B, world = cfg.train.batch_size, info.world_size
    size = P.model_size(cfg)
    param_bytes = 2 if trainer.device.type == "cuda" and cfg.train.amp != "none" else 4  # as parallelize
    flops = trainer.objective.flops_per_image(trainer.models.student)
    peak, peak_source = peak_flops(trainer.device)
    rank_img_s = [B / r["step_s"] for r in ranks]
    mean = lambda key: statistics.mean(r[key] for r in ranks)  # noqa: E731
    row = {"world_size": world, "backend": info.backend or "none", "threads": torch.get_num_threads(),
           "batch_per_rank": B, "steps": steps * blocks, "img_s_global": sum(rank_img_s),
           "img_s_per_rank": statistics.mean(rank_img_s), "img_s_rank_min": min(rank_img_s),
           "step_ms": 1e3 * mean("step_s"), "mfu": mfu(statistics.mean(rank_img_s), flops, peak),
           "peak": peak_source, "load_avg_1m": round(os.getloadavg()[0], 2),  # the box's load as this run ends
           **{k.replace("time_share/", "share_"): mean(k) for k in ranks[0] if k.startswith("time_share/")}}
    if info.is_distributed:
        step_s = mean("step_s")
        if compare:  # the all-reduce the step did not hide, by difference; compute from the no_sync steps
            compute_s = mean("nosync_step_s")
            forward_s, backward_s = (compute_s * mean(f"nosync_time_share/{p}") for p in ("forward", "backward"))
            row.update({"nosync_step_ms": 1e3 * compute_s, "comm_exposed_by_difference": 1 - compute_s / step_s})
        else:  # FSDP2: compute is what the step spent outside communication
            compute_s = step_s * (1 - mean("time_share/comm"))
            forward_s, backward_s = (step_s * mean(f"time_share/{p}") for p in ("forward", "backward"))
        comm = P.exposed_comm_seconds(size, fsdp, world, bus_gbps, forward_s, backward_s, cfg.dist.bucket_cap_mb,
                                      param_bytes)
        row.update({"comm_bytes_per_step": mine["step_comm_bytes"],
                    "predicted_comm_bytes_per_step": sum(P.comm_bytes_per_step(size, fsdp, param_bytes).values()),
                    "bus_gbps": bus_gbps, "predicted_comm_ms": 1e3 * comm["total"],
                    "predicted_exposed_comm_ms": 1e3 * comm["exposed"],
                    "predicted_efficiency": compute_s / (compute_s + comm["exposed"]),
                    "predicted_efficiency_serial": compute_s / (compute_s + comm["total"])})
    return row


def worker(args) -> None:
    """One rank of a torchrun launch (or a single process): measure each (model, mode); rank 0 writes JSON
    (`--json`, for the driver) or records the rows itself (a cluster launch)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    check_cores(local, args.threads)  # before anything starts
    import torch

    torch.set_num_threads(args.threads)
    from dinovmf import distributed as D

    info = D.init_distributed(args.backend)
    rows = []
    try:
        for model in args.models:
            for mode in args.modes:
                if mode != "ddp" and info.world_size == 1:
                    continue  # nothing to shard or to bucket
                cfg = bench_config(model, mode, args.batches[model], [f"dist.backend={args.backend}"] + args.set)
                row = measure(cfg, args.steps, args.warmup, args.blocks, args.data)
                if row is not None:
                    rows.append({"model": model, "mode": mode, "data": args.data, **row})
    finally:
        D.cleanup()
    if not info.is_main:
        return
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    else:
        add_efficiency(rows, _csv_baselines())
        write_results(rows)


# ------------------------------------------------------------------------------------------ driver

def _key(row: dict) -> tuple:
    return (row["model"], row["mode"] if row["world_size"] > 1 else "ddp", row["data"], row["batch_per_rank"],
            row["threads"])


def add_efficiency(rows: list[dict], baselines: dict) -> None:
    """Weak-scaling efficiency of each row against the one-rank row of the same configuration."""
    for row in rows:
        base = baselines.get(_key({**row, "world_size": 1}))
        row["weak_scaling_efficiency"] = (row["img_s_global"] / (row["world_size"] * base)
                                          if base else math.nan)


def _csv_baselines() -> dict:
    """{configuration: one-rank images/s} from the newest one-rank rows of this device in the CSV."""
    from bench.harness import RESULTS_DIR, device_name

    path = Path(os.environ.get("DINOVMF_BENCH_RESULTS") or RESULTS_DIR) / f"{NAME}.csv"
    if not path.is_file():
        return {}
    out, device = {}, device_name()
    with open(path, newline="") as f:
        for r in sorted(csv.DictReader(f), key=lambda r: r["date"]):
            if r["world_size"] == "1" and r["device"] == device:
                key = (r["model"], "ddp", r["data"], int(r["batch_per_rank"]), int(r["threads"]))
                out[key] = float(r["img_s_global"])
    return out


def write_results(rows: list[dict]) -> None:
    """Rows to bench/results/scaling.csv (stamped with the commit; each row has the load average of its own
    launch) and scaling.png."""
    from bench.harness import RESULTS_DIR, record

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    load = os.getloadavg()[0]
    rows = [{"load_avg_1m": round(load, 2), **r, "config": f"{r['model']}/{r['mode']}", "commit": commit}
            for r in rows]
    path = record(NAME, rows, x="world_size", y="img_s_global", group="config",
                  title="Weak scaling: global images/s (per-rank batch fixed)")
    plot_scaling(rows, Path(os.environ.get("DINOVMF_BENCH_RESULTS") or RESULTS_DIR) / f"{NAME}.png")
    return path


def plot_scaling(rows: list[dict], path: Path) -> Path:
    """Two panels: weak-scaling efficiency measured and predicted (medians over rounds), per configuration
    and world size; and where the step's time went (means over rounds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.harness import device_name

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"] if r["world_size"] > 1 else f"{r['model']}", r["world_size"]), []).append(r)

    def med(rs, key, average=statistics.median):
        values = [r[key] for r in rs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return average(values) if values else math.nan

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1, 1.3]})
    distributed = sorted(k for k in groups if k[1] > 1)
    labels = [f"{c}, {w} ranks" for c, w in distributed]
    x = range(len(distributed))
    for offset, key, label in ((-0.27, "weak_scaling_efficiency", "measured (vs the 1-rank run)"),
                               (0.0, "predicted_efficiency", "predicted: dinovmf.plan's overlap"),
                               (0.27, "predicted_efficiency_serial", "predicted: nothing overlapped")):
        left.bar([i + offset for i in x], [med(groups[k], key) for k in distributed], 0.27, label=label)
    left.axhline(1.0, color="gray", lw=0.8)
    left.set_xticks(list(x), labels, fontsize=8, rotation=35, ha="right")
    left.set_ylabel("weak-scaling efficiency")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.17), ncol=3)
    phases = ["data", "forward", "backward", "optimizer", "comm", "checkpoint", "other"]
    keys = sorted(groups, key=lambda k: (k[0].split("/")[0], k[1], k[0]))
    bottom = [0.0] * len(keys)
    for phase in phases:
        values = [med(groups[k], f"share_{phase}", statistics.mean) for k in keys]
        values = [0.0 if math.isnan(v) else v for v in values]
        right.bar([f"{c}, {w} rank(s)" for c, w in keys], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.tick_params(axis="x", labelsize=8, labelrotation=35)
    for label in right.get_xticklabels():
        label.set_horizontalalignment("right")
    right.set_ylabel("share of the step's wall time (rank mean)")
    right.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.suptitle(f"Scaling and where the step's time goes, {device_name()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def launch(world_size: int, args, json_path: Path, timeout: float) -> list[dict]:
    """One torchrun --standalone launch of the worker at `world_size` ranks; its rows."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
           "-m", "bench.bench_scaling", "--worker", "--json", str(json_path), "--threads", str(args.threads),
           "--models", *args.models, "--modes", *args.modes, "--batch", *map(str, args.batch), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--blocks", str(args.blocks), "--data", args.data,
           "--backend", args.backend] + (["--set", *args.set] if args.set else [])
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], timeout=timeout,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_scaling: the {world_size}-rank launch failed:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(json_path.read_text())


def driver(args) -> list[dict]:
    check_cores(max(args.world_sizes), args.threads)
    gpus = _visible_gpus()
    if gpus and max(args.world_sizes) > gpus:
        raise SystemExit(f"bench_scaling: --world-sizes {max(args.world_sizes)} needs as many GPUs on this machine, "
                         f"which has {gpus}; use the worker under torchrun across nodes for more")
    if 1 not in args.world_sizes:
        raise SystemExit("bench_scaling: --world-sizes must include 1 (the weak-scaling baseline)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            sizes = args.world_sizes if r % 2 == 0 else list(reversed(args.world_sizes))  # alternate the order
            found = {}
            for ws in sizes:
                print(f"[bench_scaling] round {r + 1}/{args.rounds}: {ws} rank(s)", flush=True)
                found[ws] = launch(ws, args, Path(tmp) / f"r{r}_w{ws}.json", args.timeout)
            baselines = {_key(row): row["img_s_global"] for row in found[1]}
            for ws in args.world_sizes:
                for row in found[ws]:
                    row["round"] = r
                add_efficiency(found[ws], baselines)
                rows += found[ws]
    write_results(rows)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help="run as one rank of a torchrun launch")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--models", nargs="+", default=["demo", "vit_s16"], choices=sorted(MODELS))
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=sorted(MODES))
    p.add_argument("--batch", type=int, nargs="+", default=[8, 2],
                   help="per-rank batch, one for all models or one per model (default: 8 for demo, 2 for vit_s16)")
    p.add_argument("--steps", type=int, default=5, help="steps per measured block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2, help="measured blocks (each synced, then no_sync for DDP)")
    p.add_argument("--rounds", type=int, default=2, help="driver: rounds over the world sizes")
    p.add_argument("--data", default="synthetic", help="'synthetic' crops, or a .beton for the real loader")
    p.add_argument("--backend", default="auto", help="process-group backend (auto: nccl on GPUs, else gloo)")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more config overrides")
    p.add_argument("--timeout", type=float, default=3600, help="driver: seconds per launch")
    args = p.parse_args(argv)
    if len(args.batch) not in (1, len(args.models)):
        p.error(f"--batch takes one value or one per model ({len(args.models)}), got {args.batch}")
    args.batches = dict(zip(args.models, args.batch * len(args.models) if len(args.batch) == 1 else args.batch))
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
