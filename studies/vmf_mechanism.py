"""Does the vMF normaliser act where prototype precisions differ? A factorial study with several seeds.

DINO-vMF adds `log C_p(||w_k|| / tau)` to every prototype's logit so that a prototype with a larger norm
(a larger vMF concentration kappa_k = ||w_k|| / tau) does not win assignments just for its wider logit
range. The method study (studies/methods.py) could not test this: the norms stayed within 2.5% of 1,
where log C_p is nearly the same for every prototype. This study puts the prototypes where the term can
act, by drawing their initial norms log-normally around 1 (`model.proto_norm_init_spread`, sigma) and
optionally letting them move faster (`optim.proto_norm_lr_mult`), and crosses

    vMF normaliser {off, on} x centering {logit, prob} x norm spread sigma x norm-lr multiplier x seeds

with free prototype norms in every cell (vMF off = `method=dino model.norm_last_layer=false`; on =
`method=dino_vmf`; the two methods differ in nothing else once the centering is set). Each run trains the
demo recipe (configs/demo.yaml, as studies/methods.py) for the same budget and is evaluated like the
method study (kNN top-1 with the full protocol, used and unique prototypes), plus what tests the mechanism:

    norm_{start,mid,end}_{min,median,max}  the teacher's prototype norms at step 0, mid-run and the end
    logc_range        max - min over prototypes of log C_p(||w_k|| / student_temp) at the end: the size of
                      the correction the normaliser makes (or would make, for vMF off)
    norm_wins_spearman  rank correlation between a prototype's norm and how many images it wins (the
                      teacher's argmax over the kNN images); > 0: larger norms win more
    top_norm_decile_wins  share of the images won by the 10% largest-norm prototypes (10% if norm and
                      wins were unrelated and every prototype won equally)
    diverged (NaN loss), collapsed (the trainer's teacher-entropy collapse warning), teacher_entropy

    python -m studies.vmf_mechanism                                  # the default grid (hours on 2 cores)
    python -m studies.vmf_mechanism --spreads 0,0.5 --lr-mults 10    # more cells into the same --out
    python -m studies.vmf_mechanism --report-only                    # tables, CSV and PNG from --out
    python -m studies.vmf_mechanism --model vit_base --steps 20000 --batch-size 64 \\
        --set crops.global_size=224 ...                                 # a GPU user's rerun at scale

Every finished run leaves a row file in its folder (<out>/<model>/steps<N>[_<--set>]/<cell>/seed<s>/), so
an interrupted grid continues where it stopped: finished runs are skipped, an unfinished one restarts.
Seeds are the outer loop, so a grid cut short still has whole seeds. Several processes may work through
one grid at once (e.g. one per seed, with --no-record, then one --report-only): each run is claimed by
the process that trains it. The report writes
<results-dir>/<name>.{csv,png,md}: the CSV gains the rows it does not hold yet (rows are stamped with the
device and never rewritten), the PNG and the tables in the .md (between the markers; text outside them is
kept) are redrawn from every row under --out.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import math
import os
import re
import statistics
from pathlib import Path

import torch

from bench.harness import record
from studies.methods import (ROW_FILE, add_study_arguments, eval_data, evaluate_checkpoint, initial_knn,
                                 recipe_config, recipe_name, train_and_evaluate, write_row)

VMF = ("off", "on")
CENTERINGS = ("logit", "prob")
# sigma of log g: 0 (today), 0.25 and 0.5. At p = 128 (the demo's bottleneck) and tau = 0.1, 256 draws
# give kappa in [4.6, 20] and log C_p differences of 1.5 nats (0.64 between the 5% and 95% quantiles)
# at 0.25, kappa in [2.1, 41] and 6.3 nats (1.6) at 0.5 -- against less than 0.1 nat for the norms the
# method study reached. Regenerate with `--explain-spreads`.
SPREADS = (0.0, 0.25, 0.5)
LR_MULTS = (1.0,)
SEEDS = (0, 1, 2)
STEPS = 60
# Kept until the run is evaluated (the mid-run norms are read from a checkpoint), then pruned to the last.
KEEP_CHECKPOINTS = 8
MARK_BEGIN, MARK_END = "<!-- tables:begin (written by studies/vmf_mechanism.py) -->", "<!-- tables:end -->"
# Averaged over seeds in the tables and the plot.
NORM_KEYS = tuple(f"norm_{when}{s}" for when in ("start_", "mid_", "") for s in ("min", "median", "max"))
WINS_KEYS = tuple(f"{c}{k}" for c in ("", "centered_") for k in ("used_prototypes", "norm_wins_spearman",
                                                                   "top_norm_decile_wins"))
MEAN_KEYS = ("knn_top1", "unique_prototypes", *WINS_KEYS, *NORM_KEYS, "logc_range", "teacher_entropy", "final_loss")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid; every cell has free prototype norms."""

    vmf: str            # "on": method=dino_vmf (the log C_p term); "off": method=dino with free norms
    centering: str
    spread: float       # model.proto_norm_init_spread
    lr_mult: float      # optim.proto_norm_lr_mult

    def overrides(self) -> list[str]:
        return [f"method={'dino_vmf' if self.vmf == 'on' else 'dino'}", "model.norm_last_layer=false",
                f"loss.centering={self.centering}", f"model.proto_norm_init_spread={self.spread}",
                f"optim.proto_norm_lr_mult={self.lr_mult}", f"train.keep_last={KEEP_CHECKPOINTS}"]

    @property
    def name(self) -> str:
        return f"vmf-{self.vmf}_{self.centering}_spread{self.spread:g}_lrx{self.lr_mult:g}"


def grid(vmf, centerings, spreads, lr_mults) -> list[Cell]:
    return [Cell(v, c, float(s), float(m)) for m in lr_mults for s in spreads for c in centerings for v in vmf]


def series_dir(arch: str, steps: int, extra: tuple) -> str:
    """<model>/steps<N>[_<the --set overrides as a file name>]: runs of another budget or recipe never mix."""
    slug = "_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", e) for e in extra)
    return f"{arch}/steps{steps}" + (f"_{slug}" if slug else "")


def run_config(cell: Cell, seed: int, arch: str, steps: int, batch_size: int | None, extra: tuple):
    return recipe_config(cell.overrides() + [f"train.seed={seed}"], arch, steps, batch_size, extra)


# ------------------------------------------------------------------------------------------ measures

def _min_median_max(norms: torch.Tensor, prefix: str) -> dict:
    return {f"{prefix}_min": norms.min().item(), f"{prefix}_median": norms.median().item(),
            f"{prefix}_max": norms.max().item()}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (ties get their mean rank); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return float("nan")
    return float(spearmanr(x.double().numpy(), y.double().numpy()).statistic)


def _wins_metrics(norms: torch.Tensor, wins: torch.Tensor, prefix: str) -> dict:
    """Whether the large-norm prototypes win: rank correlation of norm and wins, the top decile's share."""
    top = norms.argsort(descending=True)[:max(1, len(norms) // 10)]
    return {f"{prefix}used_prototypes": int((wins > 0).sum()), f"{prefix}norm_wins_spearman": spearman(norms, wins),
            f"{prefix}top_norm_decile_wins": (wins[top].sum() / wins.sum()).item()}


def mechanism_metrics(cfg):
    """`more_metrics` for `evaluate_checkpoint`: norm median, the normaliser's spread, and whether the
    large-norm prototypes win the teacher's assignments (argmax over the kNN images), both uncentered (as
    the method study's used prototypes) and through the checkpoint's center at the final teacher
    temperature (`centered_*`: the targets training used). On the teacher side a centering that has
    converged absorbs any per-prototype constant, the vMF offset included, so the two can differ."""
    from dinovmf.centering import teacher_distribution
    from dinovmf.objectives import build_objective
    from dinovmf.vmf import vmf_column_bias

    def metrics(weight: torch.Tensor, scores: torch.Tensor, z: torch.Tensor, state: dict) -> dict:
        norms = torch.linalg.vector_norm(weight.double(), dim=1)
        logc = vmf_column_bias(norms, cfg.loss.student_temp, weight.shape[1])
        objective = build_objective(cfg)
        objective.load_state_dict(state["loss"])
        center = objective.dino.center  # the EMA state training ended with
        vmf = dict(weight_norm=norms.float(), p=weight.shape[1]) if cfg.vmf else {}
        centered, _ = teacher_distribution(z.float() @ weight.float().t(), cfg.loss.teacher_temp, center.mode,
                                           center.state, **vmf)
        k = weight.shape[0]
        wins = torch.bincount(scores.argmax(dim=1), minlength=k).double()
        centered_wins = torch.bincount(centered.argmax(dim=1), minlength=k).double()
        row = {"norm_median": norms.median().item(), "logc_range": (logc.max() - logc.min()).item()}
        row.update(_wins_metrics(norms, wins, ""))
        row.update(_wins_metrics(norms, centered_wins, "centered_"))
        return row

    return metrics


def norms_over_training(cfg, out_dir: Path, steps: int) -> dict:
    """Teacher prototype norms (min / median / max) at step 0 (the student's init, which the teacher
    copies) and at the kept checkpoint nearest mid-run; then prunes the checkpoints to the last one."""
    from dinovmf import checkpoint as ckpt
    from dinovmf.models import init_student

    row = _min_median_max(init_student(cfg).head.g.detach().abs(), "norm_start")
    kept = ckpt.list_checkpoints(ckpt.checkpoint_dir(out_dir))
    if kept:
        step, path = min(kept, key=lambda sp: abs(sp[0] - steps / 2))
        row.update(_min_median_max(ckpt.load_checkpoint(path)["teacher"]["head.g"].abs(), "norm_mid"))
        row["norm_mid_step"] = step
        ckpt.prune_checkpoints(ckpt.checkpoint_dir(out_dir), 1)
    else:
        row.update({f"norm_mid_{s}": float("nan") for s in ("min", "median", "max")}, norm_mid_step=0)
    return row


def run_cell(cell: Cell, seed: int, arch: str, steps: int, batch_size: int | None, out_dir: Path, data,
             extra: tuple, random_init: float) -> dict:
    """Train and evaluate one (cell, seed); the row also goes to out_dir/ROW_FILE."""
    cfg = run_config(cell, seed, arch, steps, batch_size, extra)
    row = {"run_id": str(Path(series_dir(arch, steps, extra)) / cell.name / f"seed{seed}"),
           "vmf": cell.vmf, "centering": cell.centering, "norm_spread": cell.spread, "norm_lr_mult": cell.lr_mult,
           "seed": seed, "model": arch, "steps": steps, "batch_size": cfg.train.batch_size,
           "recipe": recipe_name(extra), "overrides": list(extra)}
    row.update(train_and_evaluate(cfg, out_dir, data, mechanism_metrics(cfg)))
    row.update(norms_over_training(cfg, out_dir, steps))
    row.update(diverged=row["nan_seen"], collapsed=row["collapse_warning"], knn_top1_random_init=random_init,
               knn_memory=len(data[0][1]), knn_queries=len(data[1][1]))
    write_row(out_dir / ROW_FILE, row)
    return row


def claim_run(out_dir: Path) -> bool:
    """Claim the run folder `out_dir` for this process, so that several processes can work through one
    grid (on one --out) at once: False when a live process holds it. The claim file sits beside the
    folder (which training deletes and recreates); a dead holder's claim is taken over."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    claim = out_dir.parent / f"{out_dir.name}.claim"
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(claim.read_text() or 0), 0)
            return False  # the holder is alive
        except (ProcessLookupError, ValueError, FileNotFoundError):
            claim.unlink(missing_ok=True)
            return claim_run(out_dir)
        except PermissionError:  # alive, another user's
            return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def release_run(out_dir: Path) -> None:
    (out_dir.parent / f"{out_dir.name}.claim").unlink(missing_ok=True)


def run_grid(cells: list[Cell], seeds, arch: str, steps: int, batch_size: int | None, out_root: Path, data,
             extra: tuple) -> None:
    """Every (seed, cell) without a row file yet, seeds outermost; runs another process holds are left to it."""
    runs = [(seed, cell, out_root / series_dir(arch, steps, extra) / cell.name / f"seed{seed}")
            for seed in seeds for cell in cells]
    done = sum((d / ROW_FILE).is_file() for _, _, d in runs)
    print(f"{done} of {len(runs)} runs already done", flush=True)
    random_init: dict[int, float] = {}  # the backbone a run starts from depends only on the seed
    for i, (seed, cell, out_dir) in enumerate(runs):
        if (out_dir / ROW_FILE).is_file() or not claim_run(out_dir):
            continue
        try:
            if (out_dir / ROW_FILE).is_file():  # finished by another process between the check and the claim
                continue
            cfg = run_config(cell, seed, arch, steps, batch_size, extra)
            if seed not in random_init:
                random_init[seed] = initial_knn(cfg, data)
            print(f"\n### [{i + 1}/{len(runs)}] {out_dir}", flush=True)
            row = run_cell(cell, seed, arch, steps, batch_size, out_dir, data, extra, random_init[seed])
        finally:
            release_run(out_dir)
        print({k: row[k] for k in ("knn_top1", "used_prototypes", "norm_min", "norm_max", "diverged", "wall_s")},
              flush=True)


def reevaluate(cells: list[Cell], seeds, arch: str, steps: int, batch_size: int | None, out_root: Path, data,
               extra: tuple) -> None:
    """Evaluate every finished run of the grid again (its last checkpoint) and rewrite its row."""
    from dinovmf.checkpoint import checkpoint_dir, latest_checkpoint

    for seed in seeds:
        for cell in cells:
            out_dir = out_root / series_dir(arch, steps, extra) / cell.name / f"seed{seed}"
            ckpt = latest_checkpoint(checkpoint_dir(out_dir)) if (out_dir / ROW_FILE).is_file() else None
            if ckpt is None:
                continue
            cfg = run_config(cell, seed, arch, steps, batch_size, extra)
            row = json.loads((out_dir / ROW_FILE).read_text())
            row.update(evaluate_checkpoint(ckpt, cfg, data, mechanism_metrics(cfg)),
                       knn_memory=len(data[0][1]), knn_queries=len(data[1][1]))
            write_row(out_dir / ROW_FILE, row)
            print(f"{out_dir}: kNN {row['knn_top1']:.1f}%, used {row['used_prototypes']}; "
                  f"centered {row['centered_used_prototypes']}", flush=True)


# ------------------------------------------------------------------------------------------- report

def collect_rows(out_root: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(out_root.glob(f"**/{ROW_FILE}"))]
    return [r for r in rows if "run_id" in r]  # a method-study folder under the same root is not ours


def cell_key(row: dict) -> tuple:
    return (row["model"], row["steps"], row["recipe"], row["norm_lr_mult"], row["vmf"], row["centering"],
            row["norm_spread"])


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over the finite values (std NaN below two)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else float("nan")


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per cell: its key fields, the seeds, counts of diverged / collapsed runs, and (mean, std)
    of every MEAN_KEYS column over seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(cell_key(r), []).append(r)
    out = []
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3], k[5], VMF.index(k[4]), k[6])):
        runs = cells[key]
        entry = dict(zip(("model", "steps", "recipe", "norm_lr_mult", "vmf", "centering", "norm_spread"), key))
        entry.update(seeds=sorted(r["seed"] for r in runs), diverged=sum(bool(r["diverged"]) for r in runs),
                     collapsed=sum(bool(r["collapsed"]) for r in runs),
                     knn_top1_random_init=_stats([r["knn_top1_random_init"] for r in runs])[0])
        for k in MEAN_KEYS:
            entry[k] = _stats([r.get(k, float("nan")) for r in runs])
        out.append(entry)
    return out


def paired_vmf_effect(rows: list[dict], keys: tuple) -> list[dict]:
    """`keys` of vMF on minus vMF off for the same (model, steps, recipe, lr mult, centering, spread, seed):
    the two runs share the initial weights, the prototype norms and the data order. One entry per cell
    pair: its key fields, the number of seed pairs, and (mean, std) of each difference."""
    by = {(cell_key(r), r["seed"]): r for r in rows}
    pairs: dict[tuple, list[tuple[dict, dict]]] = {}
    for (k, seed), on in by.items():
        off = by.get(((*k[:4], "off", *k[5:]), seed)) if k[4] == "on" else None
        if off is not None:
            pairs.setdefault(k[:4] + k[5:], []).append((on, off))
    return [{**dict(zip(("model", "steps", "recipe", "norm_lr_mult", "centering", "norm_spread"), k)),
             "n": len(p), **{key: _stats([on.get(key, math.nan) - off.get(key, math.nan) for on, off in p])
                             for key in keys}}
            for k, p in sorted(pairs.items())]


def _pm(stat: tuple[float, float], fmt: str = "{:.1f}") -> str:
    mean, std = stat
    if not math.isfinite(mean):
        return "-"
    return fmt.format(mean) + ("" if not math.isfinite(std) else " ± " + fmt.format(std))


def _both(entry: dict, key: str, fmt: str) -> str:
    """`key` uncentered; centered."""
    return f"{_pm(entry[key], fmt)}; {_pm(entry['centered_' + key], fmt)}"


def tables_markdown(rows: list[dict]) -> str:
    """The .md tables: per cell mean ± std over seeds, norms over training, the paired vMF effect."""
    cells = aggregate(rows)
    lines = []
    for series in dict.fromkeys((c["model"], c["steps"], c["recipe"]) for c in cells):
        model, steps, recipe = series
        sel = [c for c in cells if (c["model"], c["steps"], c["recipe"]) == series]
        batch = sorted({r["batch_size"] for r in rows if (r["model"], r["steps"], r["recipe"]) == series})
        lines += [f"### {model}, {steps} steps x batch {', '.join(map(str, batch))}, recipe `{recipe}`", "",
                  "Random-init kNN (mean over seeds): "
                  f"{statistics.fmean(c['knn_top1_random_init'] for c in sel):.1f} %."
                  " Mean ± std over seeds; `div` / `coll`: runs that diverged / raised the collapse warning.", "",
                  "Winners: the teacher's argmax over the kNN images, uncentered / through its center "
                  "(`centered_*`, the training targets).", "",
                  "| norm lr x | centering | vMF | spread | seeds | kNN top-1 % | used / 256 (uncentered; centered) "
                  "| unique | norm min / median / max (end) | log C_p range (nats) | spearman(norm, wins) "
                  "(uncentered; centered) | top-10% norms' win share (uncentered; centered) | teacher entropy "
                  "| div | coll |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sel:
            norms = " / ".join(_pm(c[k], "{:.2f}") for k in ("norm_min", "norm_median", "norm_max"))
            lines.append(f"| {c['norm_lr_mult']:g} | {c['centering']} | {c['vmf']} | {c['norm_spread']:g} | "
                         f"{len(c['seeds'])} | {_pm(c['knn_top1'])} | {_both(c, 'used_prototypes', '{:.0f}')} | "
                         f"{_pm(c['unique_prototypes'], '{:.0f}')} | {norms} | {_pm(c['logc_range'], '{:.2f}')} | "
                         f"{_both(c, 'norm_wins_spearman', '{:.2f}')} | {_both(c, 'top_norm_decile_wins', '{:.2f}')} | "
                         f"{_pm(c['teacher_entropy'], '{:.2f}')} | {c['diverged']} | {c['collapsed']} |")
        lines += ["", "Prototype norms over training (teacher; mean over seeds of min / median / max):", "",
                  "| norm lr x | centering | vMF | spread | start | mid-run | end |", "|---|---|---|---|---|---|---|"]
        for c in sel:
            at = [" / ".join(f"{c[f'norm_{when}{s}'][0]:.2f}" for s in ("min", "median", "max"))
                  for when in ("start_", "mid_", "")]
            lines.append(f"| {c['norm_lr_mult']:g} | {c['centering']} | {c['vmf']} | {c['norm_spread']:g} | "
                         + " | ".join(at) + " |")
        lines += ["", "Paired effect of the vMF normaliser (on − off, same seed: same init, norms and data order), "
                  "mean ± std over seeds:", "",
                  "| norm lr x | centering | spread | pairs | Δ kNN top-1 (points) | Δ used prototypes "
                  "(uncentered; centered) | Δ spearman(norm, wins) (uncentered; centered) | Δ norm max (end) |",
                  "|---|---|---|---|---|---|---|---|"]
        series_rows = [r for r in rows if (r["model"], r["steps"], r["recipe"]) == series]
        for e in paired_vmf_effect(series_rows, ("knn_top1", "norm_max", *WINS_KEYS)):
            lines.append(f"| {e['norm_lr_mult']:g} | {e['centering']} | {e['norm_spread']:g} | {e['n']} | "
                         f"{_pm(e['knn_top1'])} | {_both(e, 'used_prototypes', '{:.0f}')} | "
                         f"{_both(e, 'norm_wins_spearman', '{:.2f}')} | {_pm(e['norm_max'], '{:.2f}')} |")
        lines.append("")
    return "\n".join(lines)


def plot_study(rows: list[dict], path: Path) -> None:
    """Four panels against the initial norm spread, one line per (centering, vMF, norm lr) and series,
    mean over seeds with std error bars: kNN, used prototypes, end norm max / min, spearman(norm, wins)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The series (model, budget, recipe) with the most runs; the others are in the .md tables.
    series = collections.Counter((r["model"], r["steps"], r["recipe"]) for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if (r["model"], r["steps"], r["recipe"]) == series]
    cells = aggregate(rows)
    panels = [("knn_top1", "kNN top-1 (%)"), ("used_prototypes", "used prototypes (uncentered teacher argmax)"),
              ("centered_used_prototypes", "used prototypes (centered teacher: the training targets)"),
              ("norm_ratio", "prototype norm max / min at the end (log)"),
              ("norm_wins_spearman", "spearman(norm, images won), uncentered: > 0 = large norms win"),
              ("centered_norm_wins_spearman", "spearman(norm, images won), centered")]
    for c in cells:  # the ratio of the means: the per-run ratios are in the CSV
        c["norm_ratio"] = (c["norm_max"][0] / c["norm_min"][0], float("nan"))
    lines = list(dict.fromkeys((c["norm_lr_mult"], c["centering"], c["vmf"]) for c in cells))
    colours = {"logit": "tab:blue", "prob": "tab:orange"}
    fig, axes = plt.subplots(2, 3, figsize=(18, 8.5))
    for ax, (key, title) in zip(axes.flat, panels):
        for j, line in enumerate(lines):
            mult, centering, vmf = line
            sel = [c for c in cells if (c["norm_lr_mult"], c["centering"], c["vmf"]) == line]
            xs = [c["norm_spread"] + 0.006 * (j - len(lines) / 2) for c in sel]  # dodge the error bars
            label = f"{centering} centering, vMF {vmf}" + (f", norm lr x{mult:g}" if mult != 1 else "")
            ax.errorbar(xs, [c[key][0] for c in sel], yerr=[c[key][1] for c in sel], capsize=3,
                        color=colours.get(centering), ls="-" if vmf == "on" else "--",
                        marker="o" if mult == 1 else "s", mfc="white" if vmf == "off" else None, label=label)
            for x, c in zip(xs, sel):
                if c["diverged"]:
                    ax.annotate(f"{c['diverged']} NaN", (x, c[key][0]), color="red", fontsize=7)
        if key == "knn_top1":
            ax.axhline(statistics.fmean(c["knn_top1_random_init"] for c in cells), color="grey", lw=1, ls=":",
                       label="random init (mean over seeds)")
        if key == "norm_ratio":
            ax.set_yscale("log")
        ax.set_xlabel("initial norm spread sigma (log g ~ N(0, sigma^2))")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"vMF normaliser vs free prototype norms (free in every run): {series[0]}, {series[1]} steps, "
                 f"recipe '{series[2]}'; mean ± std over seeds {seeds} (solid: vMF on, dashed: off)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recorded_run_ids(csv_path: Path) -> set[tuple[str, str]]:
    """(run_id, wall_s) of the rows the CSV already holds: a row is appended once."""
    if not csv_path.is_file():
        return set()
    with open(csv_path) as f:
        return {(r.get("run_id", ""), r.get("wall_s", "")) for r in csv.DictReader(f)}


def write_markdown(rows: list[dict], path: Path) -> None:
    """Replace the tables between the markers of `path` (created with a title when missing)."""
    text = path.read_text() if path.is_file() else (
        "# The vMF normaliser where prototype precisions differ\n\n`python -m studies.vmf_mechanism` "
        "(studies/vmf_mechanism.py); the columns are described in its docstring.\n\n"
        f"{MARK_BEGIN}\n{MARK_END}\n")
    if MARK_BEGIN not in text or MARK_END not in text:
        raise ValueError(f"{path} lacks the table markers {MARK_BEGIN!r} ... {MARK_END!r}")
    head, rest = text.split(MARK_BEGIN, 1)
    tail = rest.split(MARK_END, 1)[1]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{MARK_BEGIN}\n{tables_markdown(rows)}\n{MARK_END}{tail}")
    tmp.replace(path)


def report(rows: list[dict], results_dir: Path, name: str) -> None:
    """<name>.csv (new rows appended), <name>.png and the tables of <name>.md from `rows`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    done = recorded_run_ids(results_dir / f"{name}.csv")
    new = [r for r in rows if (r["run_id"], str(r["wall_s"])) not in done]
    if new:
        record(name, new, x="norm_spread", y="knn_top1", group="vmf",
               title="kNN top-1 vs initial prototype-norm spread", results_dir=results_dir)
    plot_study(rows, results_dir / f"{name}.png")  # replaces the harness's figure
    write_markdown(rows, results_dir / f"{name}.md")


def explain_spreads(spreads, p: int, temp: float, k: int) -> str:
    """kappa range and log C_p differences of K log-normal norms per sigma (the SPREADS comment)."""
    from dinovmf.vmf import vmf_column_bias

    out = [f"K = {k} norms g = exp(sigma N(0, 1)) (seed 0), p = {p}, tau = {temp}:"]
    for sigma in spreads:
        g = torch.exp(sigma * torch.randn(k, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        logc = vmf_column_bias(g, temp, p)
        q05, q95 = torch.quantile(logc, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
        out.append(f"  sigma {sigma:g}: g in [{g.min():.2f}, {g.max():.2f}], kappa in [{g.min() / temp:.1f}, "
                   f"{g.max() / temp:.1f}], log C_p range {logc.max() - logc.min():.2f} nats "
                   f"(5-95%: {q95 - q05:.2f})")
    return "\n".join(out)


def _floats(text: str, what: str, parser) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{what}: expected comma-separated numbers, got {text!r}")
    if not values:
        parser.error(f"{what}: empty")
    return values


def _choices(text: str, what: str, allowed: tuple, parser) -> list[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        parser.error(f"{what}: {bad or text!r} not in {list(allowed)}")
    return values


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vmf", default=",".join(VMF), help="comma-separated from off,on")
    parser.add_argument("--centering", default=",".join(CENTERINGS), help="comma-separated from logit,prob")
    parser.add_argument("--spreads", default=",".join(f"{s:g}" for s in SPREADS),
                        help="initial norm spreads sigma (model.proto_norm_init_spread)")
    parser.add_argument("--lr-mults", default=",".join(f"{m:g}" for m in LR_MULTS),
                        help="norm lr multipliers (optim.proto_norm_lr_mult)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="train.seed values")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per run (the same for every run)")
    parser.add_argument("--model", default="vit_tiny", help="model.arch")
    add_study_arguments(parser, out="runs/study_vmf_mechanism", name="study_vmf_mechanism")
    parser.add_argument("--reevaluate", action="store_true",
                        help="train nothing; evaluate the finished runs of this grid again from their last "
                             "checkpoints (the norms at the start and mid-run are kept), then report")
    parser.add_argument("--explain-spreads", action="store_true",
                        help="print the kappa and log C_p ranges the spreads give at this recipe, then exit")
    args = parser.parse_args(argv)

    cells = grid(_choices(args.vmf, "--vmf", VMF, parser), _choices(args.centering, "--centering", CENTERINGS, parser),
                 _floats(args.spreads, "--spreads", parser), _floats(args.lr_mults, "--lr-mults", parser))
    seeds = [int(s) for s in _floats(args.seeds, "--seeds", parser)]
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    extra = tuple(args.extra)
    try:  # an unknown key or a bad value (a negative spread, ...) fails here, before any training
        configs = [run_config(c, seeds[0], args.model, args.steps, args.batch_size, extra) for c in cells]
    except ValueError as e:
        parser.error(str(e))
    if args.explain_spreads:
        cfg = configs[0]
        print(explain_spreads(sorted({c.spread for c in cells}), cfg.model.bottleneck_dim, cfg.loss.student_temp,
                              cfg.model.out_dim))
        return []
    torch.set_num_threads(args.threads)
    out_root = Path(args.out)
    if not args.report_only:
        data = eval_data(args, configs[0].crops.global_size)  # eval at the crop size
        if args.reevaluate:
            reevaluate(cells, seeds, args.model, args.steps, args.batch_size, out_root, data, extra)
        else:
            run_grid(cells, seeds, args.model, args.steps, args.batch_size, out_root, data, extra)
    rows = collect_rows(out_root)
    if args.record and rows:
        report(rows, Path(args.results_dir), args.name)
    return rows


if __name__ == "__main__":
    main()
