"""Benchmark: what a checkpoint costs the training loop, for today's full-gather path and the sharded ones.

    python -m bench.bench_checkpoint                                    # ViT-S/B/L presets, 1 process, 2 gloo
                                                                        # ranks with DDP and with FSDP2
    python -m bench.bench_checkpoint --models vit_s16 --setups single --reps 1
    python -m bench.bench_checkpoint --models tiny --reps 1 --results-dir /tmp/x   # a smoke run (seconds)

The state is a real Trainer's at the presets' shapes (`configs/vit_{s,b,l}16_in1k.yaml`: K = 65536, hidden
2048, p = 256): student, teacher, AdamW moments (filled by one lr = 0 step) and the centers. Three ways
to checkpoint it, measured in one process per setup, in rotation, `--reps` times:

    full_gather    the path before issue 25 (`full_gather_save`, kept here as it was): full state dicts
                   gathered to rank 0's CPU, `torch.save` of one file by rank 0 while every rank waits
    sharded_sync   `Trainer.save` with train.ckpt_async=false: every rank writes its shard (DCP)
    sharded_async  `Trainer.save` with train.ckpt_async=true: blocked for the staging copy only; the
                   write runs in a background thread. Its first save allocates the staging buffers
                   (`blocked_first_s`); the row's `blocked_s` is a second save, into buffers kept

Per row: `blocked_s` (how long the save call holds the loop, the max over ranks; median over reps),
`total_s` (until the checkpoint is complete on disk), `peak_extra_mb` (the largest growth of any rank's
resident memory during the save over its resident memory before it, freed memory handed back first; for
the async method from before its first save, so the staging buffers count), `disk_mb` (bytes on disk),
`verify_s` and `resume_s` (read the checkpoint back into the same models: the checksum check, then the
load; `resume_s` includes `verify_s`), `blocked_vs_full` (this
row's blocked time over the full-gather row's of the same run). Rows that cannot fit the machine's free
memory (`MemAvailable` less `--margin-gb`) are recorded as skipped with the reason, never run into swap.
Results: bench/results/checkpoint.{csv,png} (blocked time against model size; checkpoint_detail.png: total
time, peak extra memory and resume time), stamped with the commit, the date and the load average.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MODELS = {  # name -> (preset, overrides): the presets' real shapes
    "vit_s16": ("vit_s16_in1k", []),
    "vit_b16": ("vit_b16_in1k", []),
    "vit_l16": ("vit_l16_in1k", []),
    # For the test suite: every part of the benchmark at negligible cost.
    "tiny": ("demo", ["model.depth=1", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16"]),
}
SETUPS = {"single": (1, False), "ddp2": (2, False), "fsdp2x2": (2, True)}  # name -> (processes, FSDP2)
METHODS = ("full_gather", "sharded_sync", "sharded_async")
# Copies of the full training state (student, teacher, AdamW's two moments: 4 x params x 4 bytes) a setup
# holds at its peak over all its processes: the state itself (DDP: one per rank) plus either the staging
# copy (async: one over all ranks) or the full-gather path's copy on rank 0 (FSDP2); the staging buffers
# are freed before every other method's save, so the two never coexist.
STATE_COPIES = {"single": 2.0, "ddp2": 3.0, "fsdp2x2": 2.0}
WORKER_TIMEOUT_S = 3 * 3600


# ------------------------------------------------------------------------------------ today's path


def full_gather_save(trainer, path: Path) -> Path | None:
    """The checkpoint path before issue 25, as `Trainer.save` was: full CPU state dicts gathered onto
    rank 0, the RNG states of every rank gathered as objects, one `torch.save` on rank 0 (temp file,
    fsync, rename), every rank waiting at a barrier. Writes the version-1 single-file format (tests use
    it to check that such files still resume)."""
    import numpy as np  # noqa: F401 - the RNG states pickle numpy arrays, as they did
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from dinovmf import checkpoint as ckpt
    from dinovmf import distributed as D
    from dinovmf.models import model_args

    trainer.loss_guard.flush()
    models, info = trainer.models, trainer.info
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    stateless = ckpt._stateless_parameters(models.student, trainer.optimizer)
    optim_state = get_optimizer_state_dict(models.student, trainer.optimizer, options=opts)
    for name, param in stateless.items():
        trainer.optimizer.state.pop(param, None)
        optim_state.get("state", {}).pop(name, None)
    state = {"student": get_model_state_dict(models.student, options=opts),
             "teacher": get_model_state_dict(models.teacher, options=opts), "optimizer": optim_state}
    rng = ckpt.rng_state()
    if info.is_distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if info.is_main:
        state.update(step=trainer.step, config=trainer.cfg.to_dict(), model_args=model_args(trainer.cfg),
                     loss=trainer.objective.state_dict(), rng=rng,
                     steps_per_epoch=None if trainer.schedules is None else trainer.schedules.steps_per_epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    D.barrier()
    return path if info.is_main else None


# --------------------------------------------------------------------------------------- measuring


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class PeakRSS:
    """The largest resident set size seen, sampled every 5 ms in a thread while active."""

    def __init__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build_trainer(model: str, fsdp: bool, out_dir: Path, asynchronous: bool):
    """A Trainer at `model`'s preset shapes whose AdamW holds state for every trainable parameter."""
    from dinovmf.config import load_config
    from dinovmf.trainer import Trainer

    preset, extra = MODELS[model]
    cfg = load_config(preset, extra + [f"dist.fsdp={str(fsdp).lower()}", "train.keep_last=1",
                                       "optim.freeze_last_layer=0", f"train.ckpt_async={str(asynchronous).lower()}",
                                       "data.num_workers=0"])
    trainer = Trainer(cfg, out_dir, steps_per_epoch=1000)
    for p in trainer.trainable:  # one lr = 0 step: AdamW's moments exist, the weights do not move
        p.grad = torch.zeros_like(p)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return trainer


def release_freed_memory() -> None:
    """Hand memory freed to the allocator back to the system (glibc's malloc_trim), so that resident memory
    measured next starts from what is in use."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(trainer, method: str, root: Path, step: int, resume: bool = True) -> dict:
    """One checkpoint of `trainer` by `method` into `root`: times, memory, bytes, then (`resume`) read back."""
    from dinovmf import checkpoint as ckpt
    from dinovmf import distributed as D

    info = trainer.info
    writer = trainer._checkpoint_writer()
    writer._staging = None  # only the async method keeps a staging copy, and it allocates it again here
    release_freed_memory()
    base_rss = rss_bytes()
    trainer.step = step
    out: dict = {}
    if method == "sharded_async":  # the first save allocates the staging buffers; the row is the second
        with PeakRSS() as first_peak:
            trainer.save()
            out["blocked_first_s"] = writer.last_blocked_s
            writer.wait()
        trainer.step = step = step + 1
    else:
        first_peak = None
    D.barrier()
    start = time.perf_counter()
    with PeakRSS() as peak:
        if method == "full_gather":
            path = root / "legacy" / f"step_{step:07d}.pt"
            full_gather_save(trainer, path)
            blocked = time.perf_counter() - start
        else:
            trainer.save()
            blocked = writer.last_blocked_s
            writer.wait()
            path = ckpt.checkpoint_path(trainer.out_dir, step)
        D.barrier()
        total = time.perf_counter() - start
    peaks = [peak.peak] + ([first_peak.peak] if first_peak else [])
    out.update(blocked_s=blocked, total_s=total, peak_extra_mb=(max(peaks) - base_rss) / 2**20)
    if info.is_main:
        out["disk_mb"] = ckpt.checkpoint_bytes(path) / 2**20
    D.barrier()
    start = time.perf_counter()
    if info.is_main:
        ckpt.verify_checkpoint(path)
    out["verify_s"] = time.perf_counter() - start
    D.barrier()
    models = trainer.models
    if not resume:
        out["resume_s"] = float("nan")
    elif method == "full_gather":
        state = ckpt.load_checkpoint(path)
        ckpt.restore_full_training_state(state, models.student, models.teacher, trainer.optimizer)
        del state
    else:
        ckpt.restore_training_state(path, models.student, models.teacher, trainer.optimizer, {})
    if resume:
        D.barrier()
        out["resume_s"] = time.perf_counter() - start
    if info.is_main:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def extra_needed(method: str, setup: str, state_bytes: int) -> tuple[int, int]:
    """(bytes a save by `method` adds over all processes, bytes reading it back adds): the full-gather path
    gathers the state onto rank 0 under FSDP2 and reads the whole file on every rank; the async path
    stages one copy of the state over all ranks; the sharded reads and the sync save add little."""
    processes, fsdp = SETUPS[setup]
    if method == "full_gather":
        return (state_bytes if fsdp else 0), processes * state_bytes
    return (state_bytes if method == "sharded_async" else 0), 0


def fits(extra: int, margin: int, info) -> bool:
    """Whether this machine has `extra` bytes free beyond `margin` (rank 0's reading, on every rank)."""
    verdict = [mem_available_bytes() - margin >= extra]
    if info.is_distributed:
        torch.distributed.broadcast_object_list(verdict, src=0)
    return verdict[0]


def run_setup(model: str, setup: str, reps: int, root: Path, margin: int) -> None:
    """This process's share of one (model, setup): `reps` rounds of every method, rotated; rank 0 rewrites
    `root/rows.json` after every round (medians over the rounds so far; times and memory are the max over
    ranks), so a launch that dies keeps the rounds it finished. A save (or a read-back) that would leave
    less than `margin` bytes of memory free is not run, and the row says so."""
    from dinovmf import distributed as D

    _, fsdp = SETUPS[setup]
    trainer = build_trainer(model, fsdp, root / "run", asynchronous=True)
    info = trainer.info
    writer = trainer._checkpoint_writer()
    params = sum(p.numel() for p in trainer.models.student.parameters())  # a DTensor's numel is global
    state_bytes = 4 * params * 4  # student, teacher, AdamW's two moments in fp32
    results, notes = {m: [] for m in METHODS}, []
    step = 0
    for rep in range(reps):
        order = METHODS[rep % len(METHODS):] + METHODS[:rep % len(METHODS)]
        for method in order:
            save_extra, read_extra = extra_needed(method, setup, state_bytes)
            if not fits(save_extra, margin, info):
                notes.append(f"stopped before rep {rep} {method}: not enough free memory")
                break
            resume = fits(read_extra, margin, info)
            if not resume and rep == 0:
                notes.append(f"{method}: read-back not measured (needs {read_extra / 2**30:.1f} GB more memory)")
            writer.asynchronous = method == "sharded_async"
            step += 2
            out = measure(trainer, method, root, step, resume)
            results[method].append(gather_max(out, info))
            if info.is_main:
                print(f"{model} {setup} rep {rep} {method}: " + ", ".join(f"{k}={v:.3g}" for k, v in
                                                                       results[method][-1].items()), flush=True)
        if info.is_main and all(results.values()):
            (root / "rows.json").write_text(json.dumps(summary_rows(model, setup, info, params, results, notes)))
        if notes and notes[-1].startswith("stopped"):
            if info.is_main and not all(results.values()):
                (root / "rows.json").write_text(json.dumps([{"model": model, "setup": setup, "method": "all",
                                                             "note": notes[-1]}]))
            break
    writer.close()
    D.barrier()


def summary_rows(model: str, setup: str, info, params: int, results: dict, notes: list[str]) -> list[dict]:
    """One row per method: medians over the rounds measured (NaN values left out)."""
    rows = []
    for method in METHODS:
        runs = results[method][: min(len(r) for r in results.values())]
        row = {"model": model, "setup": setup, "processes": info.world_size, "method": method,
               "params_m": round(params / 1e6, 1), "reps": len(runs), "note": "; ".join(notes)}
        for key in runs[0]:
            values = [r[key] for r in runs if math.isfinite(r[key])]
            row[key] = statistics.median(values) if values else float("nan")
        rows.append(row)
    full = rows[0]["blocked_s"]
    for row in rows:
        row["blocked_vs_full"] = row["blocked_s"] / full
    return rows


def gather_max(out: dict, info) -> dict:
    """Each value's max over the ranks (disk_mb: rank 0's)."""
    if not info.is_distributed:
        return out
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, out)
    return {k: max(g[k] for g in gathered if k in g) for k in gathered[0]}


# ------------------------------------------------------------------------------------------ driver


def needed_bytes(model: str, setup: str) -> int:
    """What `setup` holds at its peak over its processes (STATE_COPIES) for `model`, plus 1 GB each for
    torch and the process itself."""
    from dinovmf.config import load_config
    from dinovmf.models import build_ssl_model

    preset, extra = MODELS[model]
    with torch.device("meta"):
        params = sum(p.numel() for p in build_ssl_model(load_config(preset, extra), 0.0).parameters())
    processes, _ = SETUPS[setup]
    return int(STATE_COPIES[setup] * 4 * params * 4) + processes * (1 << 30)


def launch(model: str, setup: str, reps: int, root: Path, margin_gb: float) -> list[dict]:
    """Run one (model, setup) in its own process(es) (torchrun for 2 ranks) and return its rows: those of
    the rounds it finished, with a note when it did not finish them all."""
    processes, _ = SETUPS[setup]
    rows_file = root / "rows.json"
    worker = [sys.executable, "-m", "bench.bench_checkpoint", "--worker", "--models", model, "--setups", setup,
              "--reps", str(reps), "--root", str(root), "--margin-gb", str(margin_gb)]
    if processes > 1:
        worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  str(processes), "-m", "bench.bench_checkpoint"] + worker[3:]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    try:
        subprocess.run(worker, check=True, timeout=WORKER_TIMEOUT_S, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
        failure = ""
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        failure = f"the launch failed ({type(e).__name__}) after the rounds recorded"
    if not rows_file.exists():
        return [{"model": model, "setup": setup, "method": "all", "note": failure or "no round finished"}]
    rows = json.loads(rows_file.read_text())
    for row in rows:
        row["note"] = "; ".join(n for n in (row.get("note", ""), failure) if n)
    return rows


def plot_detail(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "total_s" in r]
    panels = (("total_s", "total save time (s)"), ("peak_extra_mb", "peak extra host memory per rank (MB)"),
              ("resume_s", "time to resume (s)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label) in zip(axes, panels):
        groups: dict[str, list] = {}
        for r in measured:
            groups.setdefault(f"{r['setup']} {r['method']}", []).append((r["params_m"], r[key]))
        for name, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("student parameters (M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16", "vit_l16"], choices=sorted(MODELS))
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--margin-gb", type=float, default=3.0, help="free memory to leave to the machine")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--scratch", default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        from dinovmf import distributed as D

        run_setup(args.models[0], args.setups[0], args.reps, Path(args.root), int(args.margin_gb * 2**30))
        D.cleanup()
        return 0

    from bench.bench_step import git_commit
    from bench.harness import RESULTS_DIR, record

    commit, load_before = git_commit(), os.getloadavg()[0]
    all_rows = []
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dinovmf-bench-ckpt-"))
    try:
        for model in args.models:
            for setup in args.setups:
                need, free = needed_bytes(model, setup), mem_available_bytes() - int(args.margin_gb * 2**30)
                if need > free:
                    note = (f"skipped: needs about {need / 2**30:.1f} GB, {free / 2**30:.1f} GB available "
                            f"(MemAvailable less a {args.margin_gb:g} GB margin)")
                    print(f"{model} {setup}: {note}", flush=True)
                    all_rows.append({"model": model, "setup": setup, "method": "all", "note": note})
                    continue
                root = scratch / f"{model}-{setup}"
                root.mkdir(parents=True, exist_ok=True)
                try:
                    all_rows += launch(model, setup, args.reps, root, args.margin_gb)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    stamped = [{**r, "commit": commit, "load_avg": load} for r in all_rows]
    measured = [r for r in stamped if "blocked_s" in r]
    for r in stamped:
        r.setdefault("params_m", next((m["params_m"] for m in measured if m["model"] == r["model"]), ""))
        r.setdefault("blocked_s", float("nan"))
    for r in stamped:
        r["series"] = f"{r['setup']} {r['method']}"
    results = Path(args.results_dir) if args.results_dir else RESULTS_DIR
    record("checkpoint", [r for r in stamped if r["params_m"] != ""], x="params_m", y="blocked_s", group="series",
           title="time the training loop is blocked per checkpoint", logx=True, logy=True, device="cpu",
           results_dir=results)
    if measured:
        plot_detail(measured, results / "checkpoint_detail.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
