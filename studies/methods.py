"""A small-scale study of the DINO-vMF papers' claims, on the embedded dataset (CPU-sized).

Five methods, each trained with the demo's recipe (configs/demo.yaml) and the same budget (steps x batch,
same crops, same schedules), on a small ViT (vit_tiny) and a larger one (vit_small, fewer steps), both
with the demo's 4 blocks:

    dino             DINO, unit prototypes (norm_last_layer=True), logit centering
    dino_free_norms  DINO with trainable prototype norms but no vMF normaliser (the unstable variant)
    dino_vmf         DINO-vMF: free norms + log C_p(kappa) in the logits, probability centering
    ibot_vmf         iBOT-vMF: DINO-vMF + masked patch loss (shared head)
    koleo            DINO-vMF + KoLeo-proto on the prototypes

and two ablations, run only when named in --methods: each method's recipe centers differently (DINO logits,
DINO-vMF probabilities), so these swap the centering to tell the vMF normaliser's effect from the centering's:

    dino_prob_center       DINO (unit prototypes) with probability centering
    dino_vmf_logit_center  DINO-vMF with logit centering

Recorded per run (studies/results/study_methods.csv, via bench.harness): kNN top-1 of the teacher backbone
(k=20, T=0.07, memory and queries = the embedded train and val splits) next to a random-init backbone of
the same model; prototype utilisation (unique prototypes by greedy merge
within cosine distance 1e-3, and used prototypes = teacher argmax winners over the kNN images); the
prototype-norm spread (std/mean, min, max of ||w_k||); stability (NaN seen, collapse warnings, steps
completed). studies/results/study_methods.png plots them.

    python -m studies.methods                          # the full study (about an hour on 2 cores)
    python -m studies.methods --steps-tiny 20 --steps-small 8 --methods dino,dino_vmf   # a quicker look
    python -m studies.methods --methods ibot_vmf --no-record   # in parts: train some runs now ...
    python -m studies.methods --report-only                   # ... and record every run under --out
    python -m studies.methods --reevaluate                    # evaluate finished runs again, record
    python -m studies.methods --methods dino_free_norms,dino_vmf --models vit_tiny \
        --set optim.lr=9.6e-3 --set optim.clip_grad=0 --name study_stress   # same runs, recipe changed

The scale is tiny (the demo's 32 px crops and K = 256, 8 epochs of 3000 images for vit_tiny): the
numbers say whether the methods learn, run stably and how their prototypes behave in a short run, not
what they reach on ImageNet.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import record

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # studies/results: a study's results live beside it
METHODS = {
    "dino": ["method=dino"],
    "dino_free_norms": ["method=dino", "model.norm_last_layer=false"],
    "dino_vmf": ["method=dino_vmf"],
    "ibot_vmf": ["method=ibot_vmf", "ibot.shared_head=true"],
    "koleo": ["method=dino_vmf", "loss.koleo_weight=0.1"],
    "dino_prob_center": ["method=dino", "loss.centering=prob"],
    "dino_vmf_logit_center": ["method=dino_vmf", "loss.centering=logit"],
}
STUDY_METHODS = ("dino", "dino_free_norms", "dino_vmf", "ibot_vmf", "koleo")  # the default; the rest: ablations
MODELS = ("vit_tiny", "vit_small")

# Every run trains the demo's recipe (configs/demo.yaml: 4-block ViT on 32 px crops of the embedded images,
# patch 8, K = 256, tuned to learn within minutes on 2 CPU cores), changing only what the study controls: the
# method, the model, the budget (steps x batch) and what must be equal across runs — no wall-clock limit
# (it would cut runs at different steps), no kNN inside the trainer (the study evaluates every run the same
# way, below), fp32.
PRESET = "demo"
STUDY_OVERRIDES = ["data.val=null", "train.time_limit_min=null", "train.keep_last=1", "train.amp=none",
                   "eval.baseline=false"]
ROW_FILE = "study_row.json"  # each finished run's row, so a study can be run in parts and reported at once
EVAL_KEYS = ("knn_top1", "unique_prototypes", "used_prototypes", "norm_mean", "norm_std_over_mean",
             "norm_min", "norm_max")
# kNN memory and queries: all 3000 train / 500 val images, as `dinovmf eval knn` and the demo. A 30-per-class
# memory (an earlier default, for speed) hid the learning: with it the demo's teacher scored 28.3% vs 28.7% at
# random init, with the full memory 52.8% vs 41.8% (k = 20 neighbours out of 30 per class is nearly a
# class-prior vote).
KNN_MEMORY_PER_CLASS = None
KNN_QUERIES_PER_CLASS = None
KNN_K, KNN_TEMPERATURE = 20, 0.07


def budget_overrides(steps: int, batch_size: int | None) -> list[str]:
    """The run's length (and batch, if given); the preset's schedules (warm-ups, in epochs) stay as they are."""
    return [f"steps={steps}", f"train.log_every={max(1, steps // 10)}",
            # A checkpoint every quarter: a diverged run is evaluated at its last good one.
            f"train.ckpt_every={max(1, steps // 4)}"] + ([f"train.batch_size={batch_size}"] if batch_size else [])


def recipe_config(overrides: list[str], arch: str, steps: int, batch_size: int | None = None, extra: tuple = ()):
    """The demo recipe with the study's fixed overrides, then `overrides` (what a run varies: method,
    centering, ...), the model, the budget, and `extra` (--set: a recipe change applied to every run,
    e.g. a larger learning rate to stress stability)."""
    from dinovmf.config import load_config

    return load_config(PRESET, STUDY_OVERRIDES + list(overrides) + [f"model.arch={arch}"]
                       + budget_overrides(steps, batch_size) + list(extra))


def study_config(method: str, arch: str, steps: int, batch_size: int | None = None, extra: tuple = ()):
    """`recipe_config` of one of the study's METHODS."""
    return recipe_config(METHODS[method], arch, steps, batch_size, extra)


def recipe_name(extra) -> str:
    """The `recipe` column: the preset, plus the --set overrides when there are any."""
    return " ".join([PRESET, *extra])


# ------------------------------------------------------------------------------------------ evaluation

def load_eval_images(split: str, per_class: int | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-cropped, normalised images [N, 3, s, s] and labels of the embedded `split`: the first
    `per_class` of every class (None: all), with the EvalLoader's transform (DINO's centre crop)."""
    from PIL import Image

    from dinovmf.data.augment import normalize, to_float_nchw
    from dinovmf.data.embedded import ensure_embedded
    from dinovmf.data.eval_loader import center_box
    from dinovmf.data.fallback_loader import open_images

    images = open_images(ensure_embedded()[split])
    taken: dict[int, int] = {}
    pixels, labels = [], []
    for i in range(len(images)):
        label = int(images.labels[i])
        if per_class is not None and taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        im = images.image(i)
        top, left, side = center_box(im.height, im.width)
        im = im.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + side, top + side))
        pixels.append(torch.from_numpy(np.asarray(im).copy()))
        labels.append(label)
    return normalize(to_float_nchw(torch.stack(pixels), "cpu")), torch.tensor(labels)


@torch.no_grad()
def backbone_features(backbone, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def knn_top1(backbone, data, features: torch.Tensor | None = None) -> float:
    """kNN top-1 of `backbone` on `data`; `features`: its features of the train then val images, when
    already computed."""
    from dinovmf.eval.knn import knn_classify

    (train_x, train_y), (_, val_y) = data
    if features is None:
        features = backbone_features(backbone, torch.cat([data[0][0], data[1][0]]))
    result = knn_classify(features[:len(train_x)], train_y, features[len(train_x):], val_y, k=KNN_K,
                          temperature=KNN_TEMPERATURE)
    return result["top1"]


@torch.no_grad()
def evaluate_checkpoint(path: Path, cfg, data, more_metrics=None) -> dict:
    """kNN, prototype norms and utilisation of a checkpoint's teacher; `more_metrics(weight, scores, z,
    state)`, when given, adds its dict (from the prototypes [K, p], the uncentered assignment scores
    [N, K], the head outputs z [N, p] of the kNN images and the checkpoint)."""
    from dinovmf.checkpoint import load_checkpoint
    from dinovmf.models import build_ssl_model
    from dinovmf.prototypes import prototype_utilisation, used_prototypes
    from dinovmf.train import UTILISATION_EPS
    from dinovmf.vmf import vmf_logits

    state = load_checkpoint(path)
    teacher = build_ssl_model(cfg, 0.0)
    teacher.load_state_dict(state["teacher"])
    teacher.eval()
    weight = teacher.head.prototypes().float()
    norms = torch.linalg.vector_norm(weight, dim=1)
    (train_x, _), (val_x, _) = data
    features = backbone_features(teacher.backbone, torch.cat([train_x, val_x]))  # once, for kNN and scores
    z = teacher.head(features)
    # The teacher's assignment at its final temperature, uncentered: vMF logits for the vMF methods.
    scores = vmf_logits(z, weight, cfg.loss.teacher_temp) if cfg.vmf else z @ weight.t()
    finite = bool(torch.isfinite(weight).all())
    return {
        "evaluated_step": int(state["step"]), "knn_top1": knn_top1(teacher.backbone, data, features),
        "unique_prototypes": prototype_utilisation(weight, UTILISATION_EPS) if finite else float("nan"),
        "used_prototypes": used_prototypes(scores) if finite else float("nan"),
        "norm_mean": norms.mean().item(), "norm_std_over_mean": (norms.std() / norms.mean()).item(),
        "norm_min": norms.min().item(), "norm_max": norms.max().item(),
        **(more_metrics(weight, scores, z, state) if more_metrics is not None and finite else {}),
    }


# ------------------------------------------------------------------------------------------- one run

def train_and_evaluate(cfg, out_dir: Path, data, more_metrics=None) -> dict:
    """Train `cfg` into `out_dir` from scratch, then evaluate its last checkpoint (`evaluate_checkpoint`);
    never raises for a diverged run: the row says what happened (NaN, collapse warning, steps done)."""
    from dinovmf.checkpoint import checkpoint_dir, latest_checkpoint
    from dinovmf.monitor import read_metrics
    from dinovmf.train import NonFiniteLossError, train

    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.time()
    error = ""
    try:
        if train(cfg, out_dir).get("interrupted"):
            # The trainer turned SIGTERM / SIGINT into a clean stop: stop the study too.
            raise SystemExit(f"study stopped by a signal during {out_dir}")
    except NonFiniteLossError as e:
        error = str(e).split(";")[0]
    wall = time.time() - started

    records = read_metrics(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").exists() else []
    train_records = [r for r in records if r.get("kind") == "train"]
    last = train_records[-1] if train_records else {}
    nan_seen = bool(error) or any(isinstance(v, float) and not math.isfinite(v)
                                  for r in train_records for v in r.values())
    row = {
        "steps_completed": last.get("step", 0), "wall_s": round(wall, 1),
        "nan_seen": nan_seen, "collapse_warning": any(r.get("kind") == "warning" and r.get("warning") == "collapse"
                                                  for r in records),
        "final_loss": last.get("loss", float("nan")), "teacher_entropy": last.get("teacher_entropy", float("nan")),
        "error": error, **{k: float("nan") for k in EVAL_KEYS}, "evaluated_step": 0,
    }
    ckpt = latest_checkpoint(checkpoint_dir(out_dir))
    if ckpt is not None:
        row.update(evaluate_checkpoint(ckpt, cfg, data, more_metrics))
    return row


def write_row(path: Path, row: dict) -> None:
    """Write a run's row atomically: a row file marks a finished run, so a torn one must never exist."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row))
    tmp.replace(path)


def run_one(method: str, arch: str, steps: int, batch_size: int | None, out_root: Path, data,
            extra: tuple = ()) -> dict:
    """Train `method` on `arch`, then evaluate its last checkpoint; never raises for a diverged run."""
    cfg = study_config(method, arch, steps, batch_size, extra)
    row = {"method": method, "model": arch, "recipe": recipe_name(extra), "overrides": list(extra),
           "steps": steps, "batch_size": cfg.train.batch_size}
    row.update(train_and_evaluate(cfg, out_root / arch / method, data))
    return row


def random_init_knn(arch: str, data, extra: tuple = ()) -> float:
    """kNN of the backbone at the seed every run starts from (train.seed)."""
    return initial_knn(study_config("dino_vmf", arch, 1, extra=extra), data)


def initial_knn(cfg, data) -> float:
    """kNN of the backbone a run of `cfg` starts from (its train.seed)."""
    from dinovmf.models import init_student

    return knn_top1(init_student(cfg).backbone, data)


# ------------------------------------------------------------------------------------------- report

def _series(row: dict) -> str:
    """One bar series per (model, recipe, budget): a study may hold runs of one model at two budgets."""
    return f"{row['model']}, {row.get('recipe', PRESET)}, {row['steps']} steps"


def plot_study(rows: list[dict], path: Path) -> None:
    """Four panels, one bar per (method, series): kNN, used / unique prototypes, norm spread."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    series = list(dict.fromkeys(_series(r) for r in rows))
    width = 0.8 / len(series)
    panels = [("knn_top1", "kNN top-1 (%)"), ("used_prototypes", "used prototypes (argmax winners)"),
              ("unique_prototypes", "unique prototypes (eps = 1e-3)"),
              ("norm_std_over_mean", "prototype norm std / mean")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    for ax, (key, title) in zip(axes.flat, panels):
        for j, name in enumerate(series):
            offset = (j - (len(series) - 1) / 2) * width
            runs = {r["method"]: r for r in rows if _series(r) == name}
            xs = [i + offset for i, m in enumerate(methods) if m in runs]
            bars = ax.bar(xs, [float(runs[m][key]) for m in methods if m in runs], width, label=name)
            if key in ("knn_top1", "used_prototypes"):
                ax.bar_label(bars, fmt="%.0f" if key == "used_prototypes" else "%.1f", fontsize=7)
            for x, m in zip(xs, [m for m in methods if m in runs]):
                if runs[m].get("nan_seen"):  # diverged: evaluated at its last good checkpoint
                    ax.annotate("NaN", (x, 0), ha="center", va="bottom", color="red", fontsize=8)
            if key == "knn_top1" and runs:
                ax.axhline(next(iter(runs.values()))["knn_top1_random_init"], ls="--", lw=1,
                           color=bars.patches[0].get_facecolor(), label=f"{name}: random init")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=15, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    # Below the panels: inside the kNN panel the legend hid the bars.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    batch = sorted({r["batch_size"] for r in rows})
    fig.suptitle(f"DINO family on the embedded dataset (CPU), equal budget per series, batch {batch}; "
                 "dashed: random-init kNN", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reevaluate_runs(out_root: Path, models: list[str], methods: list[str], data) -> None:
    """Evaluate every finished run's last checkpoint (and the random-init baseline) again with `data`."""
    from dinovmf.checkpoint import checkpoint_dir, latest_checkpoint

    bases: dict[tuple, float] = {}  # random-init kNN per (model, --set overrides): the runs usually share them
    for arch in models:
        for method in methods:
            path = out_root / arch / method / ROW_FILE
            ckpt = latest_checkpoint(checkpoint_dir(path.parent)) if path.is_file() else None
            if ckpt is None:
                continue
            row = json.loads(path.read_text())
            extra = tuple(row.get("overrides", ()))
            if (arch, extra) not in bases:
                bases[arch, extra] = random_init_knn(arch, data, extra)
            base = bases[arch, extra]
            cfg = study_config(method, arch, row["steps"], row["batch_size"], extra)
            row.update(evaluate_checkpoint(ckpt, cfg, data))
            row.update(knn_top1_random_init=base, knn_memory=len(data[0][1]), knn_queries=len(data[1][1]))
            write_row(path, row)
            print(f"{arch} / {method}: kNN {row['knn_top1']:.1f}% (random init {base:.1f}%)", flush=True)


def collect_rows(out_root: Path) -> list[dict]:
    """The rows of every finished run under `out_root`, in (model, method) order."""
    rows = []
    for arch in MODELS:
        for method in METHODS:
            path = out_root / arch / method / ROW_FILE
            if path.is_file():
                rows.append(json.loads(path.read_text()))
    return rows


def add_study_arguments(parser: argparse.ArgumentParser, out: str, name: str) -> None:
    """The options every study script shares: batch, recipe changes (--set), where runs and results go,
    threads, the kNN memory and queries, recording."""
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's train.batch_size")
    parser.add_argument("--out", default=out, help="run folders (checkpoints, logs, rows)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default=name, help="results file stem: <results-dir>/<name>.{csv,png,...}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                        help="a config override applied to every run (repeatable); it names the recipe in "
                             "the results, so the same runs under another recipe are a separate series")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--knn-memory-per-class", type=int, default=KNN_MEMORY_PER_CLASS,
                        help="default: every train image")
    parser.add_argument("--knn-queries-per-class", type=int, default=KNN_QUERIES_PER_CLASS,
                        help="default: every val image")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help="write the results files from every finished run under --out (--no-record: "
                             "only train; lets a study be run in parts)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; record the runs under --out")


def eval_data(args, image_size: int) -> tuple:
    """The kNN (memory, queries) images at `image_size`, as many per class as --knn-*-per-class ask."""
    return (load_eval_images("train", args.knn_memory_per_class, image_size),
            load_eval_images("val", args.knn_queries_per_class, image_size))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(STUDY_METHODS),
                        help="comma-separated, from " + ",".join(METHODS) + " (default: the first five)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps-tiny", type=int, default=744, help="default: the demo's 8 epochs")
    parser.add_argument("--steps-small", type=int, default=465, help="default: 5 epochs")
    add_study_arguments(parser, out="runs/study_methods", name="study_methods")
    parser.add_argument("--reevaluate", action="store_true",
                        help="train nothing; evaluate the finished runs under --out again (their last "
                             "checkpoints, with the current kNN settings), then record them")
    parser.add_argument("--also-report", action="append", default=[], metavar="DIR",
                        help="another study folder whose runs are recorded and plotted with these")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    models = [m for m in args.models.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: unknown method {m!r}; choose from {list(METHODS)}")
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; choose from {list(MODELS)}")
    extra = tuple(args.extra)
    try:  # an unknown key or a bad value fails here, before any training
        first_cfg = study_config("dino_vmf", models[0] if models else MODELS[0], 1, extra=extra)
    except ValueError as e:
        parser.error(f"--set: {e}")
    torch.set_num_threads(args.threads)
    out_root = Path(args.out)

    if not args.report_only:
        data = eval_data(args, first_cfg.crops.global_size)  # eval at the crop size
    if args.reevaluate:
        reevaluate_runs(out_root, models, methods, data)
    elif not args.report_only:
        for arch in models:
            steps = args.steps_tiny if arch == "vit_tiny" else args.steps_small
            base = random_init_knn(arch, data, extra)
            for method in methods:
                print(f"\n### {arch} / {method}: {steps} steps", flush=True)
                row = run_one(method, arch, steps, args.batch_size, out_root, data, extra)
                row.update(knn_top1_random_init=base, method_index=list(METHODS).index(method),
                           knn_memory=len(data[0][1]), knn_queries=len(data[1][1]))
                write_row(out_root / arch / method / ROW_FILE, row)
                print(row, flush=True)
    rows = collect_rows(out_root) + [r for d in args.also_report for r in collect_rows(Path(d))]
    if args.record and rows:
        record(args.name, rows, x="method_index", y="knn_top1", group="model",
               title="kNN top-1 by method (method_index: "
                     + ", ".join(f"{i}={m}" for i, m in enumerate(METHODS)) + ")",
               results_dir=args.results_dir)
        # The harness drew kNN only; replace its figure with the study's four panels.
        plot_study(rows, Path(args.results_dir) / f"{args.name}.png")
    return rows


if __name__ == "__main__":
    main()
