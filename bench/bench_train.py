"""Benchmark: end-to-end training-step throughput (images/s) and MFU of DINO-vMF multi-crop training.

    python -m bench.bench_train                       # GPU: ViT-B/16, 2 x 224 + 10 x 96, K=65536
    python -m bench.bench_train --arch vit_tiny       # what a CPU box can run (few steps)
    python -m bench.bench_train --batch 32 64 --steps 300 --warmup 30 --compile

One step is exactly the trainer's (`Trainer.train_step`): teacher forward on the global crops,
student forward + backward on all crops, the DINO-vMF loss through the selected backend, gradient
clipping, fused AdamW, EMA update, under bf16 autocast on GPU. The crops are random tensors already on
the device, so the number is the model + loss + optimizer ceiling, not the data path's (see
bench_data.py). MFU is the training log's: the objective's FLOP count (`flops_per_image`) against
`dinovmf.monitor.peak_flops` (a GPU's dense bf16 data-sheet peak; on CPU a measured fp32 matmul rate).

Goal on one H100 SXM: 900 images/s for ViT-B/16 (about 45% MFU). Results are written with the device
name; CPU rows are CPU rows and say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.bench_step import STEPS_PER_EPOCH, dinovmf_training
from bench.harness import record
from dinovmf.config import load_config
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.monitor import mfu, peak_flops


def bench_config(arch: str, batch: int, args):
    overrides = [f"model.arch={arch}", f"train.batch_size={batch}", f"crops.global_size={args.global_size}",
                 f"crops.local_size={args.local_size}", f"crops.n_local={args.n_local}",
                 f"model.out_dim={args.out_dim}", f"loss.backend={args.backend}", f"train.compile={args.compile}",
                 "steps=1000000", "optim.freeze_last_layer=0", "model.patch_size=16"]
    return load_config("vit_b16_in1k", overrides)


def run_one(cfg, steps: int, warmup: int, device: torch.device) -> dict:
    training = dinovmf_training(cfg, device)
    B = cfg.train.batch_size
    crops = synthetic_crops(cfg.crops, cfg.train.batch_size, device)

    def step(i):
        return training.step(crops, STEPS_PER_EPOCH + i)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):  # compilation, autotuning, allocator warm-up
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)  # a device tensor: the trainer syncs on log steps only
    sync()
    dt = time.perf_counter() - t0
    flops = training.objective.flops_per_image(training.student)
    peak, peak_source = peak_flops(device)
    img_s = B * steps / dt
    row = {"arch": cfg.model.arch, "batch": B, "crops": f"2x{cfg.crops.global_size}+{cfg.crops.n_local}x"
           f"{cfg.crops.local_size}", "K": cfg.model.out_dim, "compile": cfg.train.compile, "steps": steps,
           "warmup_s": round(warm_s, 2), "step_ms": 1000 * dt / steps, "images_per_s": img_s,
           "gflop_per_image": flops / 1e9, "mfu": mfu(img_s, flops, peak), "peak": peak_source,
           "loss": float(loss)}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return row


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["vit_base"] if cuda else ["vit_tiny"])
    p.add_argument("--batch", type=int, nargs="+", default=[64] if cuda else [4], help="per-GPU batch sizes")
    p.add_argument("--steps", type=int, default=300 if cuda else 3)
    p.add_argument("--warmup", type=int, default=30 if cuda else 1)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=10)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--backend", default="auto", help="loss backend: auto, torch, triton, cpp")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    p.add_argument("--name", default="train_throughput", help="results file stem in bench/results/")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    rows = [run_one(bench_config(arch, b, args), args.steps, args.warmup, device)
            for arch in args.arch for b in args.batch]
    record(args.name, rows, x="batch", y="images_per_s", group="arch",
           title="DINO-vMF multi-crop training step throughput", device=device)


if __name__ == "__main__":
    main()
