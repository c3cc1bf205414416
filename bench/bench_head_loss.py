"""The head-to-loss path alone: head features -> loss -> gradients (z_s, and v / g of the weight-normed
prototypes), DINO-vMF (vmf on, probability centering, trainable g) or DINO (vmf off, logit centering,
g frozen as norm_last_layer=True).

Implementations, timed alternately in one run (median of `--iters` rounds):
  * fused:          `dinovmf.head_loss.head_to_loss` (chunked rows; on the CPU in fp32 the k-major C++
                    kernels, csrc/dino_loss_kmajor.cpp, else the row kernels of the backend);
  * eager:          `dinovmf.loss_reference.head_to_loss_reference` + backward (autograd through the [N, K]
                    logits, the reference CE, the reference teacher; its metric by-products too);
  * torch.compile:  `torch.compile` of that same reference;
  * floor:          the GEMMs no implementation can avoid, alone, at full size: the student logits
                    z_s @ v.T, its two backward products G @ v and G.T @ z_s, and the teacher's z_t @ v_t.T,
                    each in its faster layout (`floor_fn`; the eager and compiled references run theirs).
Columns: `ms` (median wall time of a step), `cpu_ms` (median process CPU time: on a shared machine the
better estimate of the quiet-machine time at 1 thread; at 2 threads it adds both threads' work, spin-waits
included), `x_floor` (= ms / floor_ms) and `cpu_x_floor`, `non_gemm_ms` (= ms - floor_ms) and, for the
fused op, `non_gemm_speedup_vs_compile` (= non-GEMM time of torch.compile / non-GEMM time of fused, wall)
and `cpu_non_gemm_speedup_vs_compile` (the same in CPU time). The reference compiles to one graph (no
graph breaks), so torch.compile gets its best chance.

Peak extra memory (`peak_extra_mb`, `peak_extra_x_logits`): the high-water mark of what one step
allocates through torch (profiler replay, `bench.harness.peak_memory`; inputs exist before the step and
are not counted) minus what any implementation must hold at the end: the teacher probabilities
[T*B, K] fp32 and the returned gradients (dz, dv, dg). For the fused op the C++ kernels' std::vector
scratch, invisible to the profiler, is added analytically (`CPP_SCRATCH_FLOATS_PER_THREAD` x K floats per
thread: the per-block [K] column sums of ce_rows and teacher_rows), and so are the buffers the op keeps
between calls on the CPU (the chunk buffer, the teacher dots that become the probabilities, the prototype
gradient; `dinovmf.cpu_memory.kept_bytes`: mappings the profiler does not see, made by the warm-up, so the
measured call does not allocate them). `peak_extra_x_logits` divides by one fp32 [S*B, K] logits tensor
(the issue's target: <= 0.25).

On a GPU (`--device cuda`: the Triton row kernels, `--dtype bfloat16` for bf16 heads) every call is
timed between `torch.cuda.synchronize()`s, the floor's GEMMs run on the device, peak memory is the CUDA
allocator's, and `cpu_ms` is host time (the launch overhead, not the work). `--configs tiny` is the dry
run's size (every code path in seconds on CPU).

    python -m bench.bench_head_loss                       # issue size (S=12,T=2,B=64,K=65536,p=256) and the demo's
    python -m bench.bench_head_loss --configs issue --iters 7 --threads 1 2
    python -m bench.bench_head_loss --device cuda --configs issue --dtype bfloat16 --methods dino_vmf dino
    python -m bench.bench_head_loss --profile             # where the fused op's time goes (torch.profiler)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.harness import peak_memory, record
from dinovmf import backends
from dinovmf.cpu_memory import kept_bytes, release_kept
from dinovmf.head_loss import head_to_loss
from dinovmf.loss_reference import head_to_loss_reference

# name: (S, T, B, K, p)
# (S, T, B, K, p): the loss-path size; `step`: the head of bench_step's dino_head configuration (how
# much of that step the op is, and how close to its GEMMs); the demo's; a dry-run size.
CONFIGS = {"issue": (12, 2, 64, 65536, 256), "step": (8, 2, 32, 65536, 256), "demo": (4, 2, 32, 256, 128),
           "tiny": (4, 2, 2, 64, 32)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPP_SCRATCH_FLOATS_PER_THREAD = 2  # ce_rows' and teacher_rows' per-block [K] partial sums
METHODS = {  # vmf, centering, g trains
    "dino_vmf": (True, "prob", True),
    "dino": (False, "logit", False),
}


class Inputs:
    """Head features and weight-normed prototypes as DINOHead makes them (v ~ U(+-1/sqrt(p)), g = 1 +- 0.2)."""

    def __init__(self, S, T, B, K, p, method: str, dtype=torch.float32, seed=0, device="cpu"):
        vmf, centering, g_trains = METHODS[method]
        gen = torch.Generator().manual_seed(seed)
        self.S, self.T, self.B, self.K, self.p = S, T, B, K, p
        self.vmf, self.centering, self.dtype, self.device = vmf, centering, dtype, torch.device(device)

        def put(x):  # drawn on the CPU (same numbers on every device), then moved
            return x.to(device=device, dtype=dtype)
        self.z_s = put(F.normalize(torch.randn(S * B, p, generator=gen), dim=1)).requires_grad_()
        self.z_t = put(F.normalize(torch.randn(T * B, p, generator=gen), dim=1))
        bound = 1.0 / p ** 0.5
        self.v = put((torch.rand(K, p, generator=gen) * 2 - 1) * bound).requires_grad_()
        self.g = put(1 + 0.2 * (torch.rand(K, generator=gen) * 2 - 1)).requires_grad_(g_trains)
        self.v_t = self.v.detach() + put(1e-3 * torch.randn(K, p, generator=gen))
        self.g_t = self.g.detach().clone()
        center = torch.full((K,), 1.0 / K) if centering == "prob" else torch.randn(K, generator=gen) * 0.1
        self.center = center.to(device)  # the EMA buffer is fp32 whatever the heads' dtype
        self.kw = dict(student_temp=0.1, teacher_temp=0.04, centering=centering, center=self.center, vmf=vmf,
                       n_global=T)

    def leaves(self):
        return [x for x in (self.z_s, self.v, self.g) if x.requires_grad]

    def clear_grads(self):
        for x in (self.z_s, self.v, self.g):
            x.grad = None

    def grad_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.leaves())

    def probs_bytes(self) -> int:
        return self.T * self.B * self.K * 4

    def logits_bytes(self) -> int:
        return self.S * self.B * self.K * 4


def step_fn(fn, x: Inputs, **extra):
    """One forward + backward of `fn` (head_to_loss or the reference), gradients into .grad (cleared
    first, so every step allocates them; see `measured_peak` for the memory measurement)."""
    def step():
        x.clear_grads()
        out = fn(x.z_s, x.z_t, (x.v, x.g), (x.v_t, x.g_t), **x.kw, **extra)
        out.loss.backward()
    step.fn, step.extra = fn, extra
    return step


def measured_peak(step, x: Inputs) -> float:
    """Peak bytes one step allocates, with the previous step's gradients freed before the measurement
    (freeing them inside it would start the allocation replay 64 MB below zero)."""
    x.clear_grads()

    def forward_backward():
        step.fn(x.z_s, x.z_t, (x.v, x.g), (x.v_t, x.g_t), **x.kw, **step.extra).loss.backward()
    return peak_memory(forward_backward, x.device)


def floor_fn(x: Inputs):
    """The unavoidable GEMMs at full size, on the inputs' device (outputs preallocated, as in the op), in
    the faster of the two layouts: on the CPU the k-major one (logits^T = v z^T; MKL writes it ~1.4x faster
    than z v^T at DINO's head, which is why the op's CPU path uses it), row-major on a GPU."""
    N, kmajor = x.S * x.B, x.device.type == "cpu"
    z_s, v = x.z_s.detach(), x.v.detach()
    like = dict(dtype=z_s.dtype, device=x.device)
    dz = torch.empty(N, x.p, **like)
    dv = torch.empty(x.K, x.p, **like)
    logits = torch.empty(*((x.K, N) if kmajor else (N, x.K)), **like)
    dots = torch.empty(*((x.K, x.T * x.B) if kmajor else (x.T * x.B, x.K)), **like)
    # the logits' gradient [N, K], stored as the op stores it (a transposed view when k-major)
    grad = (torch.randn(x.K, N, **like) * 1e-3).t() if kmajor else torch.randn(N, x.K, **like) * 1e-3

    def gemms():
        if kmajor:
            torch.mm(v, z_s.t(), out=logits)
            torch.mm(x.v_t, x.z_t.t(), out=dots)
        else:
            torch.mm(z_s, v.t(), out=logits)
            torch.mm(x.z_t, x.v_t.t(), out=dots)
        torch.mm(grad, v, out=dz)
        torch.mm(grad.t(), z_s, out=dv)
    return gemms


def alternate(fns: dict, iters: int, warmup: int, device=torch.device("cpu")) -> tuple[dict, dict]:
    """Median wall and CPU ms of each callable, timed round-robin so that machine noise hits all alike; on
    a GPU each call is bracketed by synchronisations, so wall time is the device's work, not the launches."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(iters):
        for name, f in fns.items():
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            sync()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return ({n: statistics.median(t) for n, t in wall.items()}, {n: statistics.median(t) for n, t in cpu.items()})


def profile_fused(x: Inputs, backend: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    step = step_fn(head_to_loss, x, backend=backend)
    step()
    on_gpu = x.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total",
                                    row_limit=20))


def measure(x: Inputs, config: str, method: str, threads: int, backend: str, compile_ref: bool, iters: int,
            warmup: int) -> list[dict]:
    """The CSV rows of one configuration: every implementation, alternated, plus its peak extra memory."""
    fns = {"fused": step_fn(head_to_loss, x, backend=backend), "eager": step_fn(head_to_loss_reference, x)}
    if compile_ref:
        fns["torch.compile"] = step_fn(torch.compile(head_to_loss_reference), x)
    fns["floor"] = floor_fn(x)
    release_kept()  # the kept buffers then hold what this configuration needs, no more
    wall, cpu = alternate(fns, iters, warmup, x.device)
    scratch = CPP_SCRATCH_FLOATS_PER_THREAD * threads * x.K * 4 if backend == "cpp" else 0
    base = dict(config=config, method=method, S=x.S, T=x.T, B=x.B, K=x.K, p=x.p,
                dtype=str(x.dtype).replace("torch.", ""), backend=backend, threads=threads,
                floor_ms=round(wall["floor"], 2), floor_cpu_ms=round(cpu["floor"], 2),
                floor_gflop=round(2 * (3 * x.S * x.B + x.T * x.B) * x.K * x.p / 1e9, 2))
    rows = []
    for name, f in fns.items():
        series = f"{name}, {threads} thread{'s' if threads > 1 else ''}" if x.device.type == "cpu" else name
        row = dict(base, impl=name, series=series, ms=round(wall[name], 2), cpu_ms=round(cpu[name], 2),
                   x_floor=round(wall[name] / wall["floor"], 3), cpu_x_floor=round(cpu[name] / cpu["floor"], 3),
                   non_gemm_ms=round(wall[name] - wall["floor"], 2))
        if name != "floor":
            # The fused op's kept CPU buffers exist before the measured call (warm-up made them): count them.
            kept = (scratch + kept_bytes()) if name == "fused" else 0
            extra = measured_peak(f, x) + kept - x.probs_bytes() - x.grad_bytes()
            row.update(peak_extra_mb=round(extra / 2 ** 20, 2), peak_extra_x_logits=round(extra / x.logits_bytes(), 3))
        if name == "fused" and "torch.compile" in wall:
            row["non_gemm_speedup_vs_compile"] = round((wall["torch.compile"] - wall["floor"])
                                                       / (wall[name] - wall["floor"]), 2)
            row["cpu_non_gemm_speedup_vs_compile"] = round((cpu["torch.compile"] - cpu["floor"])
                                                           / (cpu[name] - cpu["floor"]), 2)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=["dino_vmf"], choices=list(METHODS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--backend", default="auto", help="row kernels of the fused op (auto: cpp on CPU, triton on CUDA)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton kernels; GEMM floor on the device)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="heads and prototypes (bf16: GPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on CPU)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the fused op and exit")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = backends.resolve_backend(args.backend, device)
    threads_list = args.threads if device.type == "cpu" else [torch.get_num_threads()]  # host threads: CPU only
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for config in args.configs:
            for method in args.methods:
                x = Inputs(*CONFIGS[config], method, dtype=DTYPES[args.dtype], device=device)
                if args.profile:
                    profile_fused(x, backend)
                    continue
                rows += measure(x, config, method, threads, backend, compile_ref=not args.no_compile, iters=args.iters,
                                warmup=args.warmup)
    if rows:
        on = f"threads {threads_list}" if device.type == "cpu" else f"{device.type}, {backend}"
        y = "cpu_x_floor" if device.type == "cpu" else "x_floor"
        record("head_loss", rows, x="K", y=y, group="series", logx=True, device=device,
               title=f"head-to-loss fwd+bwd, {'CPU' if device.type == 'cpu' else 'wall'} time / GEMM floor "
                     f"({on}, {args.dtype})")


if __name__ == "__main__":
    main()
