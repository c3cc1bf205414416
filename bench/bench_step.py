"""Benchmark: one full training step of dinovmf against the original DINO step (bench/dino_original.py).

    python -m bench.bench_step                          # the demo's sizes and DINO's head, 2 threads
    python -m bench.bench_step --configs dino_head --steps 30 --warmup 5
    python -m bench.bench_step --configs tiny --steps 3 --results-dir /tmp/x   # a smoke run (seconds)

A step is the whole thing: schedule values into the optimizer, teacher forward on the 2 global crops,
student forward and backward on every crop, the loss, gradient clipping, the last-layer freeze, AdamW,
the teacher EMA, and the host syncs each side does. Both sides run the SAME backbone code (dinovmf's
`VisionTransformer`, same size, same drop-path) and head MLP code, the same crops (random tensors,
built once) and the same schedule values, so only the prototype layer, the loss and the step differ.
Four implementations:

    original_dino             the original algorithm, norm_last_layer=True (DINO's default)
    original_dino_free_norms  the same with a trainable weight-norm g (norm_last_layer=False)
    dinovmf_dino              dinovmf's trainer step, method=dino      (baseline: original_dino)
    dinovmf_dino_vmf          dinovmf's trainer step, method=dino_vmf  (baseline: original_dino_free_norms;
                              like it, it trains the prototype norms)

They are timed in alternation, one step each per round, the order rotated every round (so none always
runs right after the same neighbour), after `--warmup` steps each; the CSV has the median per-step
wall time and the ratio dinovmf / original from this one run (`time_ratio`; `speedup` is its inverse,
the figure the targets are stated in), and the median process CPU time per step (`cpu_ms`,
`cpu_speedup`): on a machine other jobs share, wall times swing with their load (recorded as
`load_avg`, the 1-minute load before-after) while CPU time mostly does not, but CPU time counts both
threads of a parallel region and one of a serial Python loop, so on an idle machine the wall-time
ratio is the one to read. With `--profile-steps N` (default 2) each implementation also runs N steps
under the torch profiler for a breakdown (shares of backward, AdamW, and the rest: forwards, loss,
clipping, EMA) and its top operators by self time. Results: bench/results/step_vs_dino.{csv,png},
rows labelled with the git commit (`+dirty` when tracked files were modified).

How far the op can take the step: the fused op's GEMMs alone (`op_gemm_floor`, the same four products at
the step's shapes, bench_head_loss.floor_fn) are timed in the same rotation, and each dinovmf row has the
time its steps spent inside the op (`op_ms`) and the speed-up its step would have if the op cost only
those GEMMs (`speedup_at_op_floor` = original / (step - op + floor)): the ceiling of any work on the op,
the rest of the step (backbone, head MLP, AdamW, EMA) being the same GEMMs on both sides.

Configurations (issue 14): `demo` is the demo preset's sizes (4-block ViT-Tiny/8, 2 x 32 + 2 x 16 px
crops, batch 32, K=256, hidden 512, p=128); `dino_head` is DINO's head (K=65536, hidden 2048, p=256) on a
4-block ViT-Tiny/16 with 2 x 64 + 6 x 32 px crops, batch 32 (drop-path 0.1 as DINO). Targets: dinovmf at
least 1.5x faster than the original at dino_head, for dino and dino_vmf; not slower at the demo size.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import dinovmf.loss
from bench.bench_head_loss import Inputs, floor_fn
from bench.dino_original import OriginalDINOStep
from bench.harness import record
from dinovmf.config import load_config
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.models import build_backbone, model_args
from dinovmf.schedules import build_schedules
from dinovmf.trainer import Trainer

STEPS_PER_EPOCH = 1000  # schedules need one; with optim.freeze_last_layer=0 only the values' position matters
BASE_PRESET = "demo"
COMMON = ["optim.freeze_last_layer=0", "steps=1000000", "data.num_workers=0"]
CONFIGS = {
    "demo": [],
    "dino_head": ["model.patch_size=16", "crops.global_size=64", "crops.local_size=32", "crops.n_local=6",
                  "model.out_dim=65536", "model.hidden_dim=2048", "model.bottleneck_dim=256",
                  "model.drop_path=0.1"],
    # For the test suite: every part of the step at negligible cost.
    "tiny": ["model.depth=1", "model.patch_size=8", "crops.global_size=16", "crops.local_size=8",
             "crops.n_local=2", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
             "train.batch_size=4"],
}
# The speed-up over the matching original each configuration should reach (issue 14's targets).
TARGET_SPEEDUP = {"demo": 1.0, "dino_head": 1.5}
# implementation -> (kind, dinovmf method or original's norm_last_layer, baseline implementation)
IMPLEMENTATIONS = {
    "original_dino": ("original", True, None),
    "original_dino_free_norms": ("original", False, "original_dino"),
    "dinovmf_dino": ("dinovmf", "dino", "original_dino"),
    "dinovmf_dino_vmf": ("dinovmf", "dino_vmf", "original_dino_free_norms"),
}
OP_FLOOR = "op_gemm_floor"
OP_FLOOR_NOTE = "the fused op's GEMMs alone at the step's shapes, timed in the same rotation (no loss, no step)"
BACKBONE_NOTE = ("both sides run dinovmf's VisionTransformer and head MLP; only the prototype layer, loss "
                 "and step differ")


def bench_config(name: str, method: str = "dino", extra: list[str] = ()):
    """The dinovmf config of benchmark configuration `name` for `method` (plus `extra` overrides)."""
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
    return load_config(BASE_PRESET, [f"method={method}"] + COMMON + CONFIGS[name] + list(extra))


@contextlib.contextmanager
def op_clock():
    """Yields a one-item list that collects the wall ms spent inside the fused op while the block runs: it
    wraps `dinovmf.loss.head_to_loss` (the call computes the loss and its gradients; backward only hands
    them over), bracketed by device syncs on a GPU, and restores it on exit."""
    op, spent = dinovmf.loss.head_to_loss, [0.0]

    def timed(*args, **kwargs):
        sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = op(*args, **kwargs)
        sync()
        spent[0] += 1e3 * (time.perf_counter() - t0)
        return out

    dinovmf.loss.head_to_loss = timed
    try:
        yield spent
    finally:
        dinovmf.loss.head_to_loss = op


@dataclass
class DinovmfTraining:
    """dinovmf's trainer and its step: `step(crops, step_index) -> loss` (a 0-d device tensor: the trainer
    syncs only on log steps). `op_ms` lists the time each step spent inside the fused op."""
    trainer: Trainer
    op_ms: list = field(default_factory=list)

    def step(self, crops: list[torch.Tensor], i: int) -> torch.Tensor:
        with op_clock() as spent:
            loss = self.trainer.train_step(crops, i)["loss"]
        self.op_ms.append(spent[0])
        return loss

    @property
    def student(self) -> torch.nn.Module:
        return self.trainer.models.student

    @property
    def teacher(self) -> torch.nn.Module:
        return self.trainer.models.teacher

    @property
    def objective(self) -> torch.nn.Module:
        return self.trainer.objective


def dinovmf_training(cfg, device: torch.device) -> DinovmfTraining:
    """One dinovmf training step exactly as the trainer runs it: `Trainer(cfg).train_step` (with
    `train.compile`, through torch.compile'd networks). bench_train.py uses it too."""
    return DinovmfTraining(Trainer(cfg, device=device, steps_per_epoch=STEPS_PER_EPOCH))


def original_training(cfg, device: torch.device, norm_last_layer: bool,
                      like: DinovmfTraining | None = None) -> tuple[OriginalDINOStep, Callable]:
    """The original DINO step at `cfg`'s sizes (its own loss and head, dinovmf's backbone), starting
    from `like`'s weights when given; returns (the step object, step(crops, i) -> loss)."""
    n_crops = 2 + cfg.crops.n_local
    arch = model_args(cfg)

    def backbone(drop_path: float):
        return build_backbone(drop_path_rate=drop_path, attn_backend=cfg.model.attn_backend, **arch)

    torch.manual_seed(cfg.train.seed)
    original = OriginalDINOStep(backbone, n_crops, cfg.model.out_dim, cfg.model.hidden_dim,
                                cfg.model.bottleneck_dim, norm_last_layer=norm_last_layer,
                                drop_path=cfg.model.drop_path, student_temp=cfg.loss.student_temp,
                                center_momentum=cfg.loss.center_momentum, clip_grad=cfg.optim.clip_grad,
                                device=device)
    if like is not None:
        original.load_dinovmf_state(like.student.state_dict(), like.teacher.state_dict())
    sched = build_schedules(cfg, STEPS_PER_EPOCH)
    return original, lambda crops, i: original.step(crops, sched.at(i))


def build_implementations(config: str, names: list[str], device: torch.device,
                          extra: list[str] = ()) -> dict[str, Callable]:
    """name -> step(crops, i) for the requested implementations (originals copy the weights of the
    dinovmf step with the same prototype-norm setting when it is built, so losses are comparable)."""
    steps, dinovmf = {}, {}
    for name in names:
        kind, what, _ = IMPLEMENTATIONS[name]
        if kind == "dinovmf":
            dinovmf[what] = dinovmf_training(bench_config(config, what, extra), device)
            steps[name] = dinovmf[what].step
    for name in names:
        kind, norm_last_layer, _ = IMPLEMENTATIONS[name]
        if kind == "original":
            like = dinovmf.get("dino" if norm_last_layer else "dino_vmf")
            _, steps[name] = original_training(bench_config(config, "dino", extra), device, norm_last_layer, like)
    return steps


def time_alternating(steps: dict[str, Callable], crops: list[torch.Tensor], n_steps: int,
                     warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """Per-step wall times and process CPU times (ms) of each implementation, run one step each per
    round in a rotating order after `warmup` rounds; also the last loss of each."""
    names = list(steps)
    sync = torch.cuda.synchronize if crops[0].is_cuda else (lambda: None)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    losses = {}
    for r in range(warmup + n_steps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = steps[name](crops, STEPS_PER_EPOCH + r)
            sync()
            if r >= warmup:
                wall[name].append(1e3 * (time.perf_counter() - t0))
                cpu[name].append(1e3 * (time.process_time() - c0))
    return wall, cpu, losses


def _phase(event) -> str:
    name = event.name
    if name.startswith("Optimizer.step"):
        return "optimizer"
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward"
    return "other"


def profile_breakdown(step: Callable, crops: list[torch.Tensor], start: int, n_steps: int,
                      top: int = 5) -> dict:
    """Shares of the step's CPU time in backward, AdamW and the rest (forwards, loss, clipping, EMA,
    syncs), from the profiler's top-level events, and the `top` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n_steps):
            step(crops, start + i)
    events = prof.events()
    phases = {"backward": 0.0, "optimizer": 0.0, "other": 0.0}
    for ev in events:
        if ev.cpu_parent is None:
            phases[_phase(ev)] += ev.cpu_time_total
    total = sum(phases.values()) or float("nan")
    ops = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    self_total = sum(a.self_cpu_time_total for a in ops) or float("nan")
    return {**{f"{k}_pct": round(100 * v / total, 1) for k, v in phases.items()},
            "top_ops": "; ".join(f"{a.key} {100 * a.self_cpu_time_total / self_total:.1f}%" for a in ops[:top])}


def git_commit() -> str:
    """Short hash of the checkout being measured, '+dirty' when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run_config(config: str, names: list[str], n_steps: int, warmup: int, profile_steps: int,
               device: torch.device, extra: list[str] = ()) -> list[dict]:
    """The CSV rows of one configuration: every implementation's median step time and ratios."""
    cfg = bench_config(config, "dino", extra)
    steps = build_implementations(config, names, device, extra)
    if any(IMPLEMENTATIONS[n][0] == "dinovmf" for n in names):
        steps[OP_FLOOR] = op_floor_step(cfg, device)
    crops = synthetic_crops(cfg.crops, cfg.train.batch_size, device)
    load_before = os.getloadavg()[0]
    wall, cpu, losses = time_alternating(steps, crops, n_steps, warmup)
    median = {n: statistics.median(t) for n, t in wall.items()}
    # time inside the fused op per timed step (the step's bound method carries its DinovmfTraining)
    op_ms = {n: statistics.median(steps[n].__self__.op_ms[-n_steps:])
             for n in names if IMPLEMENTATIONS[n][0] == "dinovmf"}
    cpu_median = {n: statistics.median(t) for n, t in cpu.items()}
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    commit = git_commit()
    c = cfg.crops
    rows = []
    for name in names:
        kind, _, baseline = IMPLEMENTATIONS[name]
        q = statistics.quantiles(wall[name], n=4) if len(wall[name]) > 1 else [median[name]] * 3
        row = {"config": config, "impl": name, "K": cfg.model.out_dim, "p": cfg.model.bottleneck_dim,
               "hidden": cfg.model.hidden_dim, "backbone": f"{cfg.model.arch}/{cfg.backbone.patch_size} "
               f"x{cfg.model.depth or 'all'} blocks", "crops": f"2x{c.global_size}+{c.n_local}x{c.local_size}",
               "batch": cfg.train.batch_size, "threads": torch.get_num_threads(), "steps": n_steps,
               "warmup": warmup, "step_ms": median[name], "step_ms_q1": q[0], "step_ms_q3": q[2],
               "cpu_ms": cpu_median[name], "loss": float(losses[name])}
        if baseline in median:
            row.update(baseline=baseline, time_ratio=median[name] / median[baseline],
                       speedup=median[baseline] / median[name],
                       cpu_speedup=cpu_median[baseline] / cpu_median[name])
            if kind == "dinovmf":
                # The step as it would be if the op cost only its GEMMs: how far any op work can take the step.
                at_floor = median[name] - op_ms[name] + median[OP_FLOOR]
                row.update(op_ms=op_ms[name], op_floor_ms=median[OP_FLOOR], step_ms_at_op_floor=at_floor,
                           speedup_at_op_floor=median[baseline] / at_floor)
            if kind == "dinovmf" and config in TARGET_SPEEDUP:
                row.update(target_speedup=TARGET_SPEEDUP[config],
                           meets_target=row["speedup"] >= TARGET_SPEEDUP[config])
        if profile_steps:
            row.update(profile_breakdown(steps[name], crops, STEPS_PER_EPOCH + warmup + n_steps, profile_steps))
        row.update(load_avg=load, commit=commit, note=BACKBONE_NOTE)
        rows.append(row)
    if OP_FLOOR in steps:
        q = statistics.quantiles(wall[OP_FLOOR], n=4) if len(wall[OP_FLOOR]) > 1 else [median[OP_FLOOR]] * 3
        rows.append({**{k: rows[0][k] for k in ("config", "K", "p", "hidden", "backbone", "crops", "batch",
                                                "threads", "steps", "warmup")},
                     "impl": OP_FLOOR, "step_ms": median[OP_FLOOR], "step_ms_q1": q[0], "step_ms_q3": q[2],
                     "cpu_ms": cpu_median[OP_FLOOR], "load_avg": load, "commit": commit, "note": OP_FLOOR_NOTE})
    return rows


def op_floor_step(cfg, device: torch.device) -> Callable:
    """The fused op's unavoidable GEMMs alone (bench_head_loss.floor_fn: student logits, teacher dots and the
    two backward products, fp32 as the op runs) at the step's shapes, as a step(crops, i) to alternate."""
    x = Inputs(2 + cfg.crops.n_local, 2, cfg.train.batch_size, cfg.model.out_dim, cfg.model.bottleneck_dim,
               "dino", device=device)
    gemms = floor_fn(x)
    return lambda crops, i: gemms()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["demo", "dino_head"], choices=sorted(CONFIGS))
    p.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS),
                   help="implementations to time (default: all four)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps per implementation; 0: none")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="extra dinovmf config overrides for every configuration")
    p.add_argument("--name", default="step_vs_dino", help="results file stem")
    p.add_argument("--results-dir", default=None, help="default: bench/results/")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0 or args.threads < 1:
        p.error("need --steps >= 1, --warmup >= 0, --profile-steps >= 0, --threads >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for config in args.configs:
        rows += run_config(config, args.impls, args.steps, args.warmup, args.profile_steps, device, args.set)
    record(args.name, rows, x="K", y="step_ms", group="impl", logx=True, logy=True, device=device,
           title=f"Full training step: dinovmf vs the original DINO step ({rows[0]['commit']})",
           results_dir=args.results_dir)
    return rows


if __name__ == "__main__":
    main()
