"""Benchmark: the fused photometric augmentation of a DINO multi-crop batch (2 x 224 + 10 x 96 crops per image).

    python -m bench.bench_augment [--batch 16] [--rounds 5] [--skip-compile]
    python -m bench.bench_augment --gpu-only [--gpu-batch 64] [--device cuda]     # `make gpu-check`'s slot

CPU rows (the choice the issue asks for, "C++ op or torch.compile, whichever measures faster"), on
the same uint8 crops and parameter rows, alternating the implementations round by round, medians:
- `reference_eager`: `augment.augment_reference` (today's batched torch implementation, float32);
- `torch_compile`: `compiled_candidate`, the same math written for `torch.compile` (every jitter step
  a select over the four ops, blur as a depthwise convolution), compiled by inductor;
- `cpp_<isa>`: `fused_augment` (csrc/augment_cpu.cpp) for each vector path this CPU has;
at 1 thread (per core, as in a loader worker) and at all threads (the torch op's at::parallel_for).
The floor is the memory traffic (uint8 read + float32 written: 15 bytes per pixel) over the copy
bandwidth measured in the same run.

GPU rows: `gpu_rows(batch=64)`: Triton (`fused_augment` on CUDA) and the eager reference on the GPU, per
64-image multi-crop batch, with the same floor measured on the device; `main()` records them when a GPU
is present, `--gpu-only` records only them (`make gpu-check`; with `--device cpu` the same code runs the
C++ op instead of Triton, which is what the check's dry run exercises).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import record, timeit
from dinovmf.config import AugmentConfig, CropsConfig
from dinovmf.data import augment as A
from dinovmf.data import augment_params as P
from dinovmf.data.crops import crop_key
from dinovmf.data.fused import cpu_isa_supported, fused_augment

CROPS = CropsConfig()  # DINO's 2 x 224 + 10 x 96
BYTES_PER_PIXEL = 3 + 12  # uint8 RGB in, float32 RGB out


def multicrop_batch(batch: int, seed: int = 0, device: str = "cpu"):
    """[(uint8 crops [n, s, s, 3], params [n, NUM_PARAMS])] per crop size, DINO's recipe: the global
    crops (2 per image) and the local crops (10 per image), with photo-like smooth content."""
    recipes = P.crop_recipes(AugmentConfig(), CROPS)
    g = torch.Generator().manual_seed(seed)
    groups = []
    for size, views in ((CROPS.global_size, range(CROPS.n_global)),
                        (CROPS.local_size, range(CROPS.n_global, CROPS.num_crops))):
        n = batch * len(views)
        coarse = torch.rand(n, 3, 8, 8, generator=g)
        images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        images = (images + 0.03 * torch.randn(images.shape, generator=g)).clamp(0, 1)
        images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        keys = [crop_key(seed, i, i, 0, v) for v in views for i in range(batch)]
        rows = np.repeat(recipes[list(views)], batch, axis=0)
        groups.append((images.to(device), torch.from_numpy(P.draw_params(keys, rows)).to(device)))
    return groups


def pixels(groups) -> int:
    return sum(images.shape[0] * images.shape[1] * images.shape[2] for images, _ in groups)


# ------------------------------------------------------------------------- the torch.compile candidate
def compiled_candidate(images: torch.Tensor, params: torch.Tensor, blur_width: int) -> torch.Tensor:
    """The fused augmentation in branch-free torch ops, for `torch.compile`: each jitter step computes
    the four ops and selects per row; blur is a depthwise convolution with per-row kernels zero-padded
    to `blur_width` (the batch's largest radius, a Python int so the graph is static)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    p = A.params_by_name(params)
    view = A._per_sample  # [N] -> [N, 1, 1, 1]
    x = torch.where(view(p["flip"]), x.flip(-1), x)
    staged = x
    for step in range(4):
        op = p["jitter_order"][:, step]
        luma = A.rgb_to_grayscale(staged)
        candidates = (A.adjust_brightness(staged, p["brightness"]),
                      A._blend(staged, luma.mean(dim=(1, 2, 3), keepdim=True), p["contrast"]),
                      A._blend(staged, luma, p["saturation"]),
                      A.adjust_hue(staged, p["hue"]))
        out = candidates[3]
        for k in (2, 1, 0):
            out = torch.where(view(op == k), candidates[k], out)
        staged = torch.where(view(p["jitter"]), out, staged)
    x = torch.where(view(p["gray"]), A.rgb_to_grayscale(staged).expand(-1, 3, -1, -1), staged)
    if blur_width > 0:
        n, c, h, w = x.shape
        radius = torch.where(p["blur"], A.blur_radius(p["sigma"], h, w), torch.zeros_like(p["blur"], dtype=torch.long))
        k = A.gaussian_kernels(p["sigma"], radius, blur_width).repeat_interleave(c, dim=0)
        y = x.reshape(1, n * c, h, w)
        y = F.conv2d(F.pad(y, (blur_width, blur_width, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
        y = F.conv2d(F.pad(y, (0, 0, blur_width, blur_width), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
        x = y.view(n, c, h, w)
    x = torch.where(view(p["solarize"]), A.solarize(x), x)
    return A.normalize(x)


def blur_width(params: torch.Tensor, size: int) -> int:
    blurred = params[:, P.BLUR] > 0.5
    if not blurred.any():
        return 0
    return int(A.blur_radius(params[blurred, P.SIGMA], size, size).max())


# ------------------------------------------------------------------------------------------ measuring
def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large tensor copy (read + write counted) on `device`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), warmup=2, iters=5, sync=device != "cpu")
    return 2 * nbytes / (ms * 1e-3)


def cpu_implementations(compile_candidate: bool) -> dict:
    impls = {"reference_eager": lambda groups: [A.augment_reference(A.to_float_nchw(i), p) for i, p in groups]}
    if compile_candidate:
        compiled = torch.compile(compiled_candidate, dynamic=False)
        impls["torch_compile"] = lambda groups: [compiled(i, p, blur_width(p, i.shape[1])) for i, p in groups]
    for isa in ("baseline", "avx2", "avx512"):
        if cpu_isa_supported(isa):
            impls[f"cpp_{isa}"] = (lambda isa: lambda groups: [fused_augment(i, p, isa=isa) for i, p in groups])(isa)
    return impls


def cpu_rows(batch: int, rounds: int, compile_candidate: bool) -> list[dict]:
    groups = multicrop_batch(batch)
    impls = cpu_implementations(compile_candidate)
    rows = []
    threads = torch.get_num_threads()
    bandwidth = copy_bandwidth()
    floor_ms = pixels(groups) * BYTES_PER_PIXEL / bandwidth * 1e3
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        for fn in impls.values():  # warm-up (and compilation) outside the timed rounds
            fn(groups)
        times = {name: [] for name in impls}
        for _ in range(rounds):  # alternate the implementations: machine noise hits them alike
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn(groups)
                times[name].append(time.perf_counter() - t0)
        cpp_best = min(statistics.median(t) for name, t in times.items() if name.startswith("cpp"))
        for name, t in times.items():
            ms = statistics.median(t) * 1e3
            rows.append({"implementation": name, "threads": n_threads, "batch": batch,
                         "ms_per_batch": ms, "ms_per_image": ms / batch, "images_per_s": batch / ms * 1e3,
                         "x_slower_than_best_cpp": ms / (cpp_best * 1e3),
                         "floor_ms_per_batch": floor_ms, "copy_GBps": bandwidth / 1e9})
    torch.set_num_threads(threads)
    return rows


def gpu_rows(batch: int = 64, iters: int = 20, device: str = "cuda") -> list[dict]:
    """Triton vs the eager reference on the GPU for one `batch`-image DINO multi-crop batch (2 x 224 +
    10 x 96 crops per image): ms per batch and the memory-traffic floor. The `make gpu-check` entry point;
    `device="cpu"` runs the same code with the C++ op in Triton's place (the check's dry run)."""
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("gpu_rows needs a CUDA GPU (or device='cpu' for a dry run)")
    groups = multicrop_batch(batch, device=device)
    impls = {"triton" if on_gpu else "cpp": lambda: [fused_augment(i, p) for i, p in groups],
             "reference_eager": lambda: [A.augment_reference(A.to_float_nchw(i), p) for i, p in groups]}
    bandwidth = copy_bandwidth(device, (1 << 30) if on_gpu else (64 << 20))
    floor_ms = pixels(groups) * BYTES_PER_PIXEL / bandwidth * 1e3
    rows = []
    for name, fn in impls.items():
        ms = timeit(fn, warmup=3 if iters > 1 else 1, iters=iters, sync=on_gpu)
        rows.append({"implementation": name, "batch": batch, "ms_per_batch": ms, "images_per_s": batch / ms * 1e3,
                     "floor_ms_per_batch": floor_ms, "copy_GBps": bandwidth / 1e9,
                     "x_floor": ms / floor_ms})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="multi-crop images per CPU batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile candidate")
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU rows (make gpu-check)")
    ap.add_argument("--gpu-batch", type=int, default=64, help="multi-crop images per GPU batch")
    ap.add_argument("--gpu-iters", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="where the GPU rows run (cpu: the dry run, C++ op)")
    args = ap.parse_args(argv)
    if not args.gpu_only:
        rows = cpu_rows(args.batch, args.rounds, not args.skip_compile)
        record("augment_cpu", rows, x="threads", y="images_per_s", group="implementation", device="cpu",
               title=f"fused augmentation, DINO multi-crop batch of {args.batch} (2x224 + 10x96)")
    if args.gpu_only or torch.cuda.is_available():
        record("augment_gpu", gpu_rows(args.gpu_batch, args.gpu_iters, args.device), x="batch", y="ms_per_batch",
               group="implementation", device=args.device,
               title=f"fused augmentation on {args.device}, DINO multi-crop batch of {args.gpu_batch}")


if __name__ == "__main__":
    main()
