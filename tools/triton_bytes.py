"""Count the bytes every Triton kernel launch loads, stores and updates atomically, with the repeats, by
running the host code under the Triton interpreter (TRITON_INTERPRET=1) with its memory ops instrumented.

    python -m tools.triton_bytes --json OUT.json [--S 12 --T 2 --K 65536] [--batches 1 2] [--dtypes ...]
        [--workloads NAME ...]   (names from tools/triton_cases.WORKLOADS)

For each launch: the kernel, its constexprs / num_warps / grid and argument types, and
  * loaded / stored: bytes of the distinct addresses of each `tl.load` / `tl.store` a program executes (a
    masked-off lane moves nothing; lanes of one instruction that name the same address are one request:
    the [K]-vector loads broadcast to a tile's rows, the rows of one image reading its teacher row);
    atomic: bytes of every unmasked lane of every atomic. A re-read by a later instruction counts again;
  * loaded_unique / stored_unique / atomic_unique: bytes of the distinct addresses behind them over the
    whole launch — the inputs read once and the outputs written once, i.e. the least any kernel doing this
    launch's job moves.
Counting is what the code asks for, not DRAM traffic: a re-read by a later instruction that hits L2 on a GPU
still counts, which is the point (the GPU's cache decides whether it is free; the kernel should not rely on
it). Within one instruction a warp coalesces equal addresses and a tile's other warps hit L1.

Launches are planned as on a GPU (`--sms`, default an H100 / H200's 132): the interpreter then runs the GPU's
tile sizes, so each launch carries the constexprs of a registry case and moves the GPU's bytes. Run the
host ops at a few batch sizes B and extrapolate: every count is affine in B for these kernels
(`tools/kernel_model.py` checks that on a third size), so the issue's B = 64 needs no hour-long
interpreter run.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

PREFIX = "dinovmf.kernels."
_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64",
                 "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def triton_type(value) -> str:
    """The Triton type the launcher gives an argument (pointers as *dtype; ints as i32 unless they need i64)."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return "*" + _TRITON_TYPES.get(str(value.dtype).replace("torch.", ""), str(value.dtype))
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


@dataclass
class Launch:
    kernel: str  # "<module>.<function>" inside dinovmf.kernels
    constexprs: dict
    num_warps: int
    grid: list
    arg_types: dict  # runtime argument -> Triton type
    ints: dict = field(default_factory=dict)  # runtime integer argument -> its value (sizes, for the GPU's grid)
    loaded: int = 0
    stored: int = 0
    atomic: int = 0
    loaded_unique: int = 0
    stored_unique: int = 0
    atomic_unique: int = 0
    atomic_sems: list = field(default_factory=list)

    @property
    def moved(self) -> int:
        return self.loaded + self.stored + self.atomic

    @property
    def minimum(self) -> int:
        return self.loaded_unique + self.stored_unique + self.atomic_unique


class _Accumulator:
    """Bytes and addresses of one launch; addresses are kept per access kind and element size."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.addresses: dict[tuple[str, int], list[np.ndarray]] = {}

    def add(self, kind: str, ptrs, mask, elem_bytes: int, sem: str | None = None) -> None:
        p = np.asarray(ptrs)
        m = np.broadcast_to(np.asarray(mask, dtype=bool), p.shape) if mask is not None else np.ones(p.shape, bool)
        live = p[m]
        requested = live.size if kind == "atomic" else _count_distinct(live.ravel())  # every RMW happens
        setattr(self.launch, kind, getattr(self.launch, kind) + requested * elem_bytes)
        self.addresses.setdefault((kind, elem_bytes), []).append(live.astype(np.uint64, copy=False).ravel())
        if sem is not None and sem not in self.launch.atomic_sems:
            self.launch.atomic_sems.append(sem)

    def finish(self) -> Launch:
        for (kind, size), chunks in self.addresses.items():
            unique = _count_distinct(np.concatenate(chunks))
            attr = f"{kind}_unique"
            setattr(self.launch, attr, getattr(self.launch, attr) + unique * size)
        return self.launch


def _count_distinct(a: np.ndarray) -> int:
    """len(np.unique(a)), by sorting (numpy's hash-based unique is ~20x slower on millions of addresses)."""
    if a.size == 0:
        return 0
    s = np.sort(a)
    return 1 + int(np.count_nonzero(s[1:] != s[:-1]))


def _elem_bytes(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


def _bind(fn, arg_names, args, kwargs):
    """{parameter: value} of a launch (positional and keyword arguments, defaults filled in)."""
    values = dict(zip(arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in arg_names})
    for p in inspect.signature(fn).parameters.values():
        if p.name not in values and p.default is not inspect.Parameter.empty:
            values[p.name] = p.default
    return values


def _is_constexpr(annotation) -> bool:
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


@contextlib.contextmanager
def count_launches():
    """Within the block, every interpreted kernel launch appends a `Launch` to the yielded list."""
    import triton.runtime.interpreter as interp
    from triton import knobs

    if not knobs.runtime.interpret:
        raise RuntimeError("count_launches needs TRITON_INTERPRET=1 before triton is imported")
    records: list[Launch] = []
    stack: list[_Accumulator] = []
    builder, fn_cls = interp.InterpreterBuilder, interp.InterpretedFunction
    originals = {name: getattr(builder, name) for name in
                 ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    original_run = fn_cls.run

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if stack:
            stack[-1].add("loaded", ptrs.data, mask.data, _elem_bytes(ptrs))
        return originals["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        if stack:
            stack[-1].add("stored", ptrs.data, mask.data, _elem_bytes(ptrs))
        return originals["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        if stack:
            stack[-1].add("atomic", ptr.data, mask.data, _elem_bytes(ptr), str(sem).split(".")[-1].lower())
        return originals["create_atomic_rmw"](self, rmw_op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        if stack:
            stack[-1].add("atomic", ptr.data, None, _elem_bytes(ptr), str(sem).split(".")[-1].lower())
        return originals["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        values = _bind(self.fn, self.arg_names, args, kwargs)
        annotations = inspect.get_annotations(self.fn)
        consts = {a: v for a, v in values.items() if _is_constexpr(annotations.get(a, ""))}
        grid_v = grid(values | kwargs) if callable(grid) else grid
        grid_v = [int(g) for g in (grid_v if isinstance(grid_v, (tuple, list)) else (grid_v,))]
        name = f"{self.fn.__module__.removeprefix(PREFIX)}.{self.fn.__name__}"
        runtime = {a: v for a, v in values.items() if a not in consts}
        launch = Launch(name, consts, int(kwargs.get("num_warps", 4)), grid_v,
                        {a: triton_type(v) for a, v in runtime.items()},
                        {a: v for a, v in runtime.items() if isinstance(v, int) and not isinstance(v, bool)})
        stack.append(_Accumulator(launch))
        try:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            records.append(stack.pop().finish())

    patched = {"create_masked_load": masked_load, "create_masked_store": masked_store,
               "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas}
    try:
        for name, f in patched.items():
            setattr(builder, name, f)
        fn_cls.run = run
        yield records
    finally:
        for name, f in originals.items():
            setattr(builder, name, f)
        fn_cls.run = original_run


GPU_SMS = 132  # the launch geometry counted by default: an H100 SXM / H200's (kernels.tiling plans per SM count)


@contextlib.contextmanager
def gpu_geometry(sm_count: int | None):
    """Within the block, `kernels.tiling` plans every launch as on a GPU with `sm_count` SMs (None: the
    interpreter's own, coarser tiling), so the interpreted launches carry the GPU's constexprs (the registry's
    cases) and move the GPU's bytes."""
    from dinovmf.kernels import tiling

    if sm_count is None:
        yield
        return
    original = tiling._gpu_sms
    tiling._gpu_sms = lambda device, requested: requested or sm_count
    try:
        yield
    finally:
        tiling._gpu_sms = original


def count_workload(run, S: int, T: int, B: int, K: int, dtype, sm_count: int | None = GPU_SMS) -> list[Launch]:
    """The launches (with their bytes) of one call `run(S, T, B, K, dtype)` of a host workload, planned as on
    a GPU with `sm_count` SMs (see `gpu_geometry`)."""
    import torch

    torch.manual_seed(0)
    with gpu_geometry(sm_count), count_launches() as launches:
        run(S, T, B, K, dtype)
    return launches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the launches")
    ap.add_argument("--S", type=int, default=12)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--K", type=int, default=65536)
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes B (default: each workload's own)")
    ap.add_argument("--dtypes", nargs="+", help="data dtypes to run (default: each workload's own)")
    ap.add_argument("--workloads", nargs="*", help="names from tools/triton_cases.WORKLOADS (default: all)")
    ap.add_argument("--sms", type=int, default=GPU_SMS, help="plan launches as on a GPU with this many SMs")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("tools.triton_bytes needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    import torch

    from tools.triton_cases import WORKLOADS

    chosen = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads]
    unknown = set(args.workloads or ()) - {w.name for w in WORKLOADS}
    if unknown:
        print(f"unknown workloads {sorted(unknown)}; known: {[w.name for w in WORKLOADS]}", file=sys.stderr)
        return 2
    out = []
    for w in chosen:
        for dtype in (d for d in w.dtypes if not args.dtypes or d in args.dtypes):
            for B in args.batches or w.batches:
                launches = count_workload(w.run, args.S, args.T, B, args.K, getattr(torch, dtype), args.sms)
                out.append(dict(workload=w.name, dtype=dtype, S=args.S, T=args.T, B=B, K=args.K,
                                launches=[asdict(x) for x in launches]))
                print(f"{w.name:28s} {dtype:9s} B={B}: {len(launches)} launches, "
                      f"{sum(x.moved for x in launches) / 2**20:.1f} MiB moved", flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
