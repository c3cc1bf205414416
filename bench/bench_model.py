"""Forward+backward throughput and MFU of the multi-crop student, per attention backend.

One step = the student (backbone, DINO head, fp32 prototype logits) on 2 global + N local crops, forward
and backward against a fixed random direction over the logits (no optimizer, no loss kernels: those
have their own benchmarks). Reported per configuration:
ms per step, images/s, achieved TFLOP/s and MFU, and peak memory.

FLOPs are counted, not profiled, with the training log's counter (`MultiCropWrapper.forward_flops`:
backbone, head MLP and the prototype logits, which this step computes too) times 3 for forward +
backward; peak FLOP/s is the training log's too (`dinovmf.monitor.peak_flops`), so an MFU here and one in
a training log are the same measure.

    python -m bench.bench_model                      # CPU here: vit_tiny, batch 2, N in {2, 6, 10}
    OMP_NUM_THREADS=1 python -m bench.bench_model    # on a shared, oversubscribed CPU box
    python -m bench.bench_model --models vit_small vit_base vit_large --batch 64   # on a GPU
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import device_name, peak_memory, record, timeit
from dinovmf.config import CropsConfig
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.models import DINOHead, MultiCropWrapper, build_backbone, xformers_available
from dinovmf.monitor import mfu, peak_flops


def step_flops(student: MultiCropWrapper, crops: list[torch.Tensor]) -> int:
    """Counted forward+backward matmul FLOPs of one student step on `crops` (square, one batch)."""
    return 3 * crops[0].shape[0] * student.forward_flops([c.shape[-1] for c in crops])


def bench_config(name: str, attn: str, n_local: int, args, device, peak: float) -> dict:
    torch.manual_seed(0)
    backbone = build_backbone(name, patch_size=args.patch_size, drop_path_rate=0.1, attn_backend=attn)
    student = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim=args.out_dim)).to(device).train()
    crops = synthetic_crops(CropsConfig(global_size=args.global_size, local_size=args.local_size, n_local=n_local),
                            args.batch, device)
    # A fixed random direction over the logits (a sum of softmax-like terms would have a near-zero gradient).
    probe = torch.randn(len(crops) * args.batch, student.head.out_dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step():
        student.zero_grad(set_to_none=True)
        with autocast:
            z = student(crops)["z"]
        logits = z.float() @ student.head.prototypes().t()  # in fp32, as the loss computes them
        (logits * probe).sum().backward()

    ms = timeit(step, warmup=args.warmup, iters=args.iters)
    flops = step_flops(student, crops)
    mem = peak_memory(step, device)
    achieved = flops / (ms * 1e-3)
    return {
        "config": f"{name}/{attn}", "model": name, "attn": attn,
        "n_local": n_local, "batch": args.batch, "dtype": args.dtype,
        "cpu_threads": torch.get_num_threads(),
        "ms_per_step": ms, "img_per_s": args.batch / (ms * 1e-3),
        "gflop_per_step": flops / 1e9, "achieved_tflops": achieved / 1e12,
        "mfu": mfu(args.batch / (ms * 1e-3), flops / args.batch, peak),
        "peak_mem_mb": mem / 2 ** 20,
    }


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+",
                   default=["vit_small", "vit_base", "vit_large"] if on_gpu else ["vit_tiny"])
    p.add_argument("--attn", nargs="+", default=["sdpa", "xformers", "math"])
    p.add_argument("--n-local", nargs="+", type=int, default=[10] if on_gpu else [2, 6, 10])
    p.add_argument("--batch", type=int, default=64 if on_gpu else 2, help="images per step")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--out-dim", type=int, default=65536, help="prototypes K")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if on_gpu else "fp32",
                   help="bf16 = autocast")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    peak, peak_source = peak_flops(device)
    print(f"{device_name(device)}: peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    rows = []
    for name in args.models:
        for attn in args.attn:
            if attn == "xformers" and not xformers_available():
                print("skipping attn=xformers: xformers is not importable here")
                continue
            for n_local in args.n_local:
                row = bench_config(name, attn, n_local, args, device, peak)
                row["peak_tflops"] = peak / 1e12
                row["peak_source"] = peak_source
                rows.append(row)
                print(f"  {row['config']} N={n_local}: {row['img_per_s']:.3g} img/s, "
                      f"MFU {row['mfu']:.1%}", flush=True)
    record("model_throughput", rows, x="n_local", y="img_per_s", group="config",
           title=f"multi-crop student fwd+bwd, 2x{args.global_size} + N x{args.local_size}, "
                 f"batch {args.batch}, {args.dtype}", device=device)


if __name__ == "__main__":
    main()
