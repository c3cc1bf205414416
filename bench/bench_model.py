"""Forward+backward throughput and MFU of the multi-crop student, per attention backend.

One step = the student (backbone + DINO head) on 2 global + N local crops, forward and backward
(no optimizer, no loss kernels: those have their own benchmarks). Reported per configuration:
ms per step, images/s, achieved TFLOP/s and MFU, and peak memory.

FLOPs are counted, not profiled: `VisionTransformer.forward_flops` (patch embedding, qkv, Q K^T,
attention x V, proj, MLP) and `DINOHead.flops`, times 3 for forward + backward (backward = 2x
forward, the usual convention; the input-gradient of the patch embedding is not actually computed, so
this slightly overstates the work).

Peak FLOP/s: on GPU the datasheet dense bf16 number when the device is known (H100/H200: 989e12),
otherwise a measured large bf16 matmul; on CPU a measured large fp32 matmul.

    python -m bench.bench_model                      # CPU here: vit_tiny, batch 2, N in {2, 6, 10}
    OMP_NUM_THREADS=1 python -m bench.bench_model    # on a shared, oversubscribed CPU box
    python -m bench.bench_model --models vit_small vit_base vit_large --batch 64   # on a GPU
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import device_name, peak_memory, record, timeit
from dinovmf.models import DINOHead, MultiCropWrapper, build_backbone, xformers_available

# Dense bf16 tensor-core peaks (no sparsity) by device-name substring.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul: the practical peak where no datasheet number applies."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timeit(lambda: a @ b, warmup=2, iters=5)
    return 2 * n ** 3 / (ms * 1e-3)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"datasheet {key} dense bf16"
        return measured_matmul_flops(device, torch.bfloat16, 8192), "measured bf16 matmul 8192^3"
    return measured_matmul_flops(device, torch.float32, 2048), "measured fp32 matmul 2048^3"


def make_crops(batch: int, n_local: int, global_size: int, local_size: int,
               device: torch.device) -> list[torch.Tensor]:
    sizes = [global_size] * 2 + [local_size] * n_local
    return [torch.randn(batch, 3, s, s, device=device) for s in sizes]


def step_flops(student: MultiCropWrapper, crops: list[torch.Tensor]) -> int:
    """Counted forward+backward matmul FLOPs of one student step."""
    backbone = student.backbone
    forward = sum(c.shape[0] * backbone.forward_flops(c.shape[-2], c.shape[-1]) for c in crops)
    forward += student.head.flops(sum(c.shape[0] for c in crops))
    return 3 * forward


def bench_config(name: str, attn: str, n_local: int, args, device, peak: float) -> dict:
    torch.manual_seed(0)
    backbone = build_backbone(name, patch_size=args.patch_size, drop_path_rate=0.1, attn_backend=attn)
    student = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim=args.out_dim)).to(device).train()
    crops = make_crops(args.batch, n_local, args.global_size, args.local_size, device)
    # A fixed random direction: z has unit rows, so e.g. ||z||^2 would have a zero gradient.
    probe = torch.randn(len(crops) * args.batch, student.head.bottleneck_dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step():
        student.zero_grad(set_to_none=True)
        with autocast:
            z = student(crops)["z"]
        (z.float() * probe).sum().backward()

    ms = timeit(step, warmup=args.warmup, iters=args.iters)
    flops = step_flops(student, crops)
    mem = peak_memory(step, device)
    achieved = flops / (ms * 1e-3)
    return {
        "config": f"{name}/{attn}", "model": name, "attn": attn,
        "n_local": n_local, "batch": args.batch, "dtype": args.dtype,
        "cpu_threads": torch.get_num_threads(),
        "ms_per_step": ms, "img_per_s": args.batch / (ms * 1e-3),
        "gflop_per_step": flops / 1e9, "achieved_tflops": achieved / 1e12, "mfu": achieved / peak,
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
    p.add_argument("--out-dim", type=int, default=65536, help="prototypes K (not used by fwd/bwd here)")
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
