"""Does continued pretraining keep what the weights know? The demo pretrained, exported, then continued.

A fresh DINO head on a trained backbone sends large, meaningless gradients into it before the head has learned
anything; users report the kNN of a released backbone collapsing within a few thousand images of continued
pretraining. This study measures it at demo scale on the CPU:

1. pretrain the demo recipe (configs/demo.yaml: a 4-block ViT-Tiny on the embedded data, 8 epochs, seed 0)
   and export its teacher (`dinovmf export`);
2. continue from that export with a fresh head, for the demo's length again, in three arms:
   - `plain`         model.init_from only;
   - `freeze`        + optim.freeze_backbone_steps=93 (one epoch: the backbone and its EMA copy fixed while
                     the head and prototypes learn, then the backbone's lr warms up again);
   - `freeze_decay`  + optim.layer_decay=0.75 (block i of 4 at lr x 0.75^(4 - i), the embeddings at 0.75^5 =
                     0.24 of the head's lr: the bottom-to-top ratio DINOv2's 0.9 gives a 12-block ViT, 0.9^13
                     = 0.25);
   each with >= 2 seeds (the head's initialisation, the data order, drop-path), and the teacher's kNN top-1
   (the demo's protocol: k = 20, T = 0.07, all 3000 / 500 embedded images at 32 px) at step 0, every 16 steps
   in the first 128 and every `--eval-every` steps after.

The goal of the recipe: the kNN never more than 1 point below where it started (the export's) and at or above
it at the end. Results: studies/results/continue_pretraining.{csv,png,md}; one CSV row per evaluation, written
when a run finishes, so an interrupted study resumes with the runs it lacks (`--report-only` redraws the plot
and the summary from the CSV).

    python -m studies.continue_pretraining                  # about 7 demo-length runs: an hour or more on 2 cores
    python -m studies.continue_pretraining --seeds 1,2,3 --arms freeze_decay
    python -m studies.continue_pretraining --report-only
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import time
from pathlib import Path

import torch

from bench.bench_step import git_commit
from bench.harness import record
from studies.methods import KNN_K, KNN_TEMPERATURE, knn_top1, load_eval_images

NAME = "continue_pretraining"
RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    "plain": [],
    "freeze": ["optim.freeze_backbone_steps=93"],
    "freeze_decay": ["optim.freeze_backbone_steps=93", "optim.layer_decay=0.75"],
    # Under stress: 4x the demo's lr (the demo's 2x already "learned and then forgot", README), as a user who
    # continues with a from-scratch recipe's larger lr; the fresh head's gradients are then 4x larger too.
    "plain_lr4x": ["optim.lr=9.6e-3"],
    "freeze_decay_lr4x": ["optim.lr=9.6e-3", "optim.freeze_backbone_steps=93", "optim.layer_decay=0.75"],
}
DEFAULT_ARMS = ("plain", "freeze", "freeze_decay")  # the study as the issue asks it; --arms adds the others
# Every run: the demo recipe as `make demo` trains it, without its wall-clock cap (the box is shared: a slow
# minute must not shorten a run), without the end-of-run kNN (evaluated here, in memory, at every interval),
# with one loader thread (the crops are a function of the seed, not of the thread count; on a shared box fewer
# threads wait less for each other; --threads sets torch's).
COMMON = ["train.time_limit_min=null", "data.val=null", "eval.baseline=false", "data.num_workers=1"]
SOURCE_SEED = 0
GOAL_DROP = 1.0  # points of kNN the recipe may lose at most, below the start
# The head is fresh in the first steps, when a backbone is damaged if at all: kNN every 16 steps there.
EARLY_STEPS, EARLY_EVERY = 128, 16


def pretrain_source(out: Path, extra: list[str]) -> Path:
    """The demo, pretrained once (seed 0) and its teacher exported; reused when it is already there."""
    from dinovmf.checkpoint import checkpoint_dir, latest_checkpoint
    from dinovmf.config import load_config
    from dinovmf.models import export_teacher_backbone
    from dinovmf.train import train

    export = out / "source" / "teacher.safetensors"
    if export.is_file():
        return export
    cfg = load_config("demo", [*COMMON, *extra, f"train.seed={SOURCE_SEED}"])
    if train(cfg, out / "source" / "run").get("interrupted"):  # SIGTERM / SIGINT: a clean stop, not a source
        raise SystemExit("study stopped by a signal while pretraining the source")
    return export_teacher_backbone(latest_checkpoint(checkpoint_dir(out / "source" / "run")), export)


def continue_run(arm: str, seed: int, export: Path, out: Path, data, eval_every: int, extra: list[str]) -> list[dict]:
    """One continued run from `export`: the teacher's kNN at step 0 and every `eval_every` steps."""
    from dinovmf import distributed as D
    from dinovmf.config import load_config
    from dinovmf.train import build_train_loader
    from dinovmf.trainer import Trainer, to_floats

    cfg = load_config("demo", [*COMMON, *extra, *ARMS[arm], f"model.init_from={export}", f"train.seed={seed}"])
    run_dir = out / arm / f"seed{seed}"
    loader = build_train_loader(cfg, run_dir, D.init_distributed(cfg.dist.backend))
    trainer = Trainer(cfg, run_dir, steps_per_epoch=len(loader))
    total = trainer.schedules.total_steps
    started = time.time()

    def evaluate(step: int, metrics: dict) -> dict:
        knn = knn_top1(trainer.teacher_backbone(), data)
        print(f"  {arm} seed {seed} step {step}/{total}: kNN {knn:.1f}", flush=True)
        return {"arm": arm, "seed": seed, "step": step, "knn_top1": knn, "loss": metrics.get("loss", float("nan")),
                "backbone_lr_scale": trainer.schedules.at(max(step - 1, 0))["backbone_lr_scale"],
                "overrides": " ".join(extra + ARMS[arm]), "total_steps": total, "wall_s": round(time.time() - started, 1)}

    rows = [evaluate(0, {})]
    step = 0
    while step < total:
        loader.set_epoch(step // trainer.schedules.steps_per_epoch)
        for crops, _ in loader:
            metrics = trainer.train_step(crops, step)
            step += 1
            if step % eval_every == 0 or (step < EARLY_STEPS and step % EARLY_EVERY == 0) or step == total:
                rows.append(evaluate(step, to_floats(metrics)))
            if step == total:
                break
    loader.close()
    return rows


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarise(rows: list[dict]) -> tuple[str, dict]:
    """A markdown table per arm and seed: start, minimum, end, and whether the goal held."""
    runs: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        runs.setdefault((r["arm"], str(r["seed"])), []).append((int(r["step"]), float(r["knn_top1"])))
    lines = ["| arm | seed | kNN at start | lowest (step) | end | lowest - start | end - start | goal met |",
             "|---|---|---|---|---|---|---|---|"]
    verdict = {}
    for (arm, seed), points in sorted(runs.items()):
        points.sort()
        start, end = points[0][1], points[-1][1]
        low_step, low = min(points, key=lambda p: p[1])
        met = low >= start - GOAL_DROP and end >= start
        verdict.setdefault(arm, []).append(met)
        lines.append(f"| {arm} | {seed} | {start:.1f} | {low:.1f} ({low_step}) | {end:.1f} | {low - start:+.1f} | "
                     f"{end - start:+.1f} | {'yes' if met else 'no'} |")
    return "\n".join(lines), verdict


def plot(rows: list[dict], path: Path) -> None:
    """kNN against step per arm: the mean over seeds, the range of the seeds shaded; the start and the goal's
    floor (1 point below it) as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    start = statistics.mean(float(r["knn_top1"]) for r in rows if int(r["step"]) == 0)
    for arm in ARMS:
        by_step: dict[int, list[float]] = {}
        for r in rows:
            if r["arm"] == arm:
                by_step.setdefault(int(r["step"]), []).append(float(r["knn_top1"]))
        if not by_step:
            continue
        steps = sorted(by_step)
        seeds = len(by_step[steps[0]])
        line, = ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], marker=".", label=f"{arm} ({seeds} seeds)")
        ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(start, color="black", lw=1, ls="--", label=f"start (the export): {start:.1f}")
    ax.axhline(start - GOAL_DROP, color="gray", lw=1, ls=":", label="goal's floor: start - 1")
    ax.set_xlabel("continued-pretraining step (batch 32)")
    ax.set_ylabel("teacher kNN top-1 (%)")
    ax.set_title("Continuing the demo from its export with a fresh head (CPU, embedded data)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(csv_path: Path) -> None:
    rows = read_rows(csv_path)
    if not rows:
        raise SystemExit(f"no rows in {csv_path}")
    plot(rows, csv_path.with_suffix(".png"))
    table, verdict = summarise(rows)
    md = csv_path.with_suffix(".md")
    md.write_text(f"# Continued pretraining on the demo (written by studies/continue_pretraining.py)\n\n"
                  f"kNN: k = {KNN_K}, T = {KNN_TEMPERATURE}, the teacher's CLS features of all embedded images. "
                  f"Goal: never more than {GOAL_DROP:g} point below the start, at or above it at the end.\n\n"
                  f"{table}\n\n" + "\n".join(f"- {arm}: goal met in {sum(v)} of {len(v)} seeds"
                                              for arm, v in verdict.items()) + "\n")
    print(table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated arms of {list(ARMS)}")
    parser.add_argument("--seeds", default="1,2", help="seeds of the continued runs (the source uses 0)")
    parser.add_argument("--eval-every", type=int, default=62,
                        help=f"steps between kNN evaluations (every {EARLY_EVERY} in the first {EARLY_STEPS})")
    parser.add_argument("--out", default="runs/study_continue", help="run folders (the source export is kept)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the source and every run (e.g. steps=10 for a smoke run)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    csv_path = Path(args.results_dir) / f"{NAME}.csv"
    if args.report_only:
        return report(csv_path)
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; arms: {list(ARMS)}")
    out = Path(args.out)
    export = pretrain_source(out, args.set)
    data = (load_eval_images("train", None, 32), load_eval_images("val", None, 32))
    done = {(r["arm"], str(r["seed"])) for r in read_rows(csv_path)}
    code = git_commit()  # the code these runs use: read at the start, while later commits may land during the study
    for seed in map(int, args.seeds.split(",")):  # seeds outside: a study cut short still has whole seeds
        for arm in args.arms.split(","):
            if (arm, str(seed)) in done:
                print(f"{arm} seed {seed}: in {csv_path}, skipped", flush=True)
                continue
            rows = continue_run(arm, seed, export, out, data, args.eval_every, args.set)
            stamp = {"commit": code, "load_avg_1m": round(os.getloadavg()[0], 2),
                     "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            record(NAME, [{**r, **stamp} for r in rows], x="step", y="knn_top1", group="arm",
                   title=f"{arm} seed {seed}", results_dir=args.results_dir)
            report(csv_path)  # the plot and the summary of every run so far (replaces record's one-run plot)


if __name__ == "__main__":
    main()
