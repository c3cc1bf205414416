"""What each DINOv2 / DINOv3 backbone option costs: the training step of ViT-S with it, against the plain ViT-S/16.

One step = `Trainer.train_step` (student forward + backward on 2 global + N local crops, teacher forward, loss,
AdamW, EMA) with a small DINO head (K = 4096, hidden 512), so the backbone is most of it. Configurations, all
ViT-S (384 wide, 12 blocks, 6 heads) at the same crops (224 and 112 px, multiples of both 14 and 16):

    vit_s16       the classic ViT-S/16 (learned positions, MLP, no layer scale): the reference
    +layerscale   vit_s16 with LayerScale            +swiglu   with DINOv2's SwiGLU FFN
    +reg4         with 4 registers                   +rope     with DINOv3's 2-D RoPE (key bias masked)
    dinov2_s14    the DINOv2 ViT-S/14 preset (patch 14: more tokens; layer scale; its 37 x 37 position grid
                  resampled to each crop)
    dinov3_s16    the DINOv3 ViT-S/16 preset (RoPE, layer scale, 4 storage tokens)

Eager and `train.compile=true` (torch.compile per block and head), each mode in its own rotation: one step of
every configuration per round, rotating the order, medians over the rounds; the ratio to vit_s16 of the same
rotation is what counts (the shared box's speed drifts). Wall time and the process's CPU time are both kept:
on an oversubscribed box with one thread the CPU time is the steadier measure of the work. Rows:
bench/results/backbone_step.{csv,png}, with the load average, the thread count and the commit.

    python -m bench.bench_backbones                      # both modes, 5 rounds each
    OMP_NUM_THREADS=1 python -m bench.bench_backbones --threads 1 --modes eager
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench.bench_step import dinovmf_training, git_commit, time_alternating
from bench.harness import record
from dinovmf.config import load_config
from dinovmf.data.synthetic import synthetic_crops

VIT_S16 = ["model.arch=vit_small"]
CONFIGS = {
    "vit_s16": VIT_S16,
    "+layerscale": VIT_S16 + ["model.layerscale_init=1e-5"],
    "+swiglu": VIT_S16 + ["model.ffn=swiglu"],
    "+reg4": VIT_S16 + ["model.num_register_tokens=4"],
    "+rope": VIT_S16 + ["model.pos_encoding=rope"],
    "dinov2_s14": ["model.arch=dinov2_vits14"],
    "dinov3_s16": ["model.arch=dinov3_vits16"],
}
REFERENCE = "vit_s16"
# No drop-path: per-block compilation guards on each block's drop rate, and 12 different rates x 2 crop sizes
# pass torch._dynamo's recompile limit (8), after which the remaining blocks silently run eager.
COMMON = ["method=dino", "model.out_dim=4096", "model.hidden_dim=512", "model.bottleneck_dim=128",
          "model.drop_path=0", "crops.global_size=224", "crops.local_size=112", "train.batch_size=2",
          "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "data.num_workers=0"]


def tokens(cfg) -> int:
    """Tokens the student sees per image: CLS, registers and patches of every crop."""
    opts = cfg.backbone
    sizes = [cfg.crops.global_size] * 2 + [cfg.crops.local_size] * cfg.crops.n_local
    return sum(1 + opts.num_register_tokens + (s // opts.patch_size) ** 2 for s in sizes)


def run_mode(mode: str, names: list[str], n_local: int, rounds: int, warmup: int, commit: str) -> list[dict]:
    extra = [f"crops.n_local={n_local}", f"train.compile={'true' if mode == 'compile' else 'false'}"]
    configs = {name: load_config(None, COMMON + CONFIGS[name] + extra) for name in names}
    trainings = {name: dinovmf_training(cfg, torch.device("cpu")) for name, cfg in configs.items()}
    crops = {name: synthetic_crops(cfg.crops, cfg.train.batch_size) for name, cfg in configs.items()}
    steps = {name: (lambda _crops, i, t=trainings[name], c=crops[name]: t.step(c, i)) for name in names}
    load_before = os.getloadavg()[0]
    wall, cpu, _ = time_alternating(steps, crops[names[0]], rounds, warmup)
    rows = []
    reference, reference_cpu = statistics.median(wall[REFERENCE]), statistics.median(cpu[REFERENCE])
    for name in names:
        student = trainings[name].student
        ms, cpu_ms = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append({"config": name, "mode": mode, "step_ms": round(ms, 1), "vs_vit_s16": round(ms / reference, 3),
                     "cpu_ms": round(cpu_ms, 1), "cpu_vs_vit_s16": round(cpu_ms / reference_cpu, 3),
                     "tokens_per_image": tokens(configs[name]),
                     "backbone_params": sum(p.numel() for p in student.backbone.parameters()),
                     "batch": configs[name].train.batch_size, "crops": f"2x224+{n_local}x112", "rounds": rounds,
                     "threads": torch.get_num_threads(), "load_avg_1m": round((load_before + os.getloadavg()[0]) / 2, 2),
                     "commit": commit})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="eager")
    parser.add_argument("--compile-configs", nargs="+", default=[REFERENCE, "dinov2_s14", "dinov3_s16"],
                        choices=list(CONFIGS), help="compiled (each compiles its blocks once: minutes on a CPU)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--n-local", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="rounds first (compile: the compilation)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--name", default="backbone_step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, commit = [], git_commit()  # the code measured: read at the start, commits may land while it runs
    for mode in args.modes:  # each mode recorded as soon as it is measured
        chosen = args.configs if mode == "eager" else args.compile_configs
        names = [REFERENCE] + [n for n in chosen if n != REFERENCE]
        mode_rows = run_mode(mode, names, args.n_local, args.rounds, args.warmup, commit)
        path = record(args.name, mode_rows, x="tokens_per_image", y="step_ms", group="mode",
                      title="ViT-S training step against the tokens per image (CPU)")
        rows += mode_rows
        plot_ratios(rows, path.with_suffix(".png"))  # the figure that answers the question replaces record's
    return rows


def plot_ratios(rows: list[dict], path) -> None:
    """Bars: each configuration's step time relative to vit_s16, per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["config"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ratios = {r["config"]: r["vs_vit_s16"] for r in rows if r["mode"] == mode}
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [ratios.get(n, float("nan")) for n in names], width, label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(f"step time / {REFERENCE}'s")
    r0 = rows[0]
    ax.set_title(f"ViT-S training step, {r0['crops']} crops, batch {r0['batch']}, {r0['threads']} thread(s), "
                 f"load {r0['load_avg_1m']}, {r0['commit']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
