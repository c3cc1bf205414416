"""Compile every launched @triton.jit kernel of `dinovmf.kernels` ahead of time for NVIDIA GPUs, no GPU needed.

    python -m tools.triton_aot [--quick] [--arch 90 --arch 80] [--stats] [--out DIR]

The kernels are found by importing every module of `dinovmf.kernels` and listing the @triton.jit functions
defined there (autotuned ones included). Each must be either compiled by a case of the registry
`tools/triton_cases.py` (the signatures and constexprs the host code launches it with) or listed there as
a device function (called from kernels only, and never launched by host code: a `name[grid](...)` launch of
a listed device function anywhere in the package fails the check). A stale registry entry fails too.

Each case goes through Triton's whole pipeline (ttir -> ttgir -> llir -> ptx -> cubin with the ptxas
bundled in the triton wheel) for each target: sm_90 (H100/H200) and sm_80 (A100). `--quick` compiles the
representative subset marked `ci=True` (what `make test` runs), each autotuned kernel in its first config
only; the default is every case and every autotune config (`make cuda-check`). `--only PREFIX` keeps the
cases of kernels whose name starts with PREFIX (e.g. `augment.`). `--stats` prints ptxas -v registers /
spills and shared memory per case.
Exit status 0 when every case compiles and every kernel is covered, 1 otherwise.

TRITON_INTERPRET must be 0 before triton is first imported (under the interpreter @triton.jit yields
objects that cannot be compiled), so this module sets it at import and refuses to run in a process that
already imported triton in interpreter mode: run it as its own process.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from tools.kernel_static import parse_ptxas_log
from tools.triton_cases import DEVICE_FUNCTIONS, Case

PACKAGE = "dinovmf.kernels"
REGISTRY = "tools/triton_cases.py"
ARCHS = (90, 80)


def require_compile_mode() -> None:
    """Make this process compile (TRITON_INTERPRET=0) before triton is imported, or fail saying why."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling needs TRITON_INTERPRET=0 before triton is imported; this process already "
                           "imported triton in interpreter mode: run `python -m tools.triton_aot` instead")
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU runtime's default (FMA contraction on)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="dinovmf-triton-aot-"))


# ------------------------------------------------------------------------------------------ discovery
@dataclass(frozen=True)
class Kernel:
    name: str  # "<module>.<function>" inside dinovmf.kernels
    jit: object  # the JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    autotuner: object | None  # the Autotuner when the module exposes the kernel through @triton.autotune

    @property
    def source(self) -> str:
        return inspect.getsource(self.jit.fn)


def _unwrap(obj) -> tuple[object | None, object | None]:
    """(jit function, Autotuner or None) behind a module attribute, or (None, None) if it is not a kernel.
    Works in both modes: JITFunction when compiling, InterpretedFunction under the interpreter."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, KernelInterface

    jit_types = (JITFunction, InterpretedFunction)
    tuner = None
    while isinstance(obj, KernelInterface) and not isinstance(obj, jit_types):
        if isinstance(obj, Autotuner):
            tuner = obj
        obj = getattr(obj, "fn", None)
    return (obj, tuner) if isinstance(obj, jit_types) else (None, None)


def kernel_modules() -> dict[str, object]:
    """Every module of dinovmf.kernels, imported (a module that fails to import is an error)."""
    pkg = importlib.import_module(PACKAGE)
    return {m.name: importlib.import_module(f"{PACKAGE}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)}


def discover(modules: Mapping[str, object]) -> dict[str, Kernel]:
    """The @triton.jit functions defined (not merely imported) in each module."""
    found: dict[str, Kernel] = {}
    for short, mod in modules.items():
        for obj in vars(mod).values():
            jit, tuner = _unwrap(obj)
            if jit is None or jit.fn.__module__ != mod.__name__:
                continue
            name = f"{short}.{jit.fn.__name__}"
            previous = found.get(name)  # the bare function and its autotuned wrapper may both be attributes
            found[name] = Kernel(name, jit, tuner or (previous.autotuner if previous else None))
    return found


def host_launches(names: Iterable[str], roots: Iterable[Path]) -> dict[str, list[str]]:
    """{kernel name: ["file:line", ...]} where Python code under `roots` launches it: `fn[grid](...)`, or
    through `kernels.tiling`: `tiling.launch(fn, ...)`, `tiling.tuned(fn)`."""
    files = sorted({p for root in roots for p in Path(root).rglob("*.py")})
    texts = {f: f.read_text().splitlines() for f in files}
    out: dict[str, list[str]] = {}
    for name in names:
        short = re.escape(name.split('.')[-1])
        pat = re.compile(rf"\b{short}\s*\[|\b(?:launch|tuned)\(\s*{short}\b")
        out[name] = [f"{f.name}:{i + 1}" for f, lines in texts.items() for i, line in enumerate(lines)
                     if pat.search(line)]
    return out


def package_roots() -> list[Path]:
    import dinovmf
    pkg = importlib.import_module(PACKAGE)
    return [Path(dinovmf.__file__).parent, Path(pkg.__file__).parent]


def coverage_problems(sources: Mapping[str, str], case_kernels: Iterable[str], device_functions: Iterable[str],
                      launches: Mapping[str, list[str]]) -> list[str]:
    """Why the registry does not match the kernels: one message per problem (empty: all covered).

    `sources`: every discovered @triton.jit function -> its source; `case_kernels`: kernels with a compile
    case; `device_functions`: functions the registry says are only called from kernels; `launches`:
    where the host code launches each function (see `host_launches`)."""
    cased, device = set(case_kernels), set(device_functions)
    problems = []
    for name in sorted(cased | device):
        if name not in sources:
            problems.append(f"{REGISTRY} names {name}, which is not a @triton.jit function of {PACKAGE}")
    for name in sorted(cased & device):
        problems.append(f"{name} has compile cases and is also listed in DEVICE_FUNCTIONS: pick one")
    for name in sorted(sources):
        sites = launches.get(name, [])
        if name in device and name not in cased:
            short = name.split(".")[-1]
            callers = [o for o, src in sources.items() if o != name and re.search(rf"\b{re.escape(short)}\s*\(", src)]
            if sites:
                problems.append(f"{name} is listed in DEVICE_FUNCTIONS but host code launches it at "
                                f"{', '.join(sites)}: give it compile cases in {REGISTRY}")
            elif not callers:
                problems.append(f"{name} is listed in DEVICE_FUNCTIONS but no kernel calls it")
        elif name not in cased:
            where = f" (launched at {', '.join(sites)})" if sites else ""
            problems.append(f"{name}{where} has no compile case in {REGISTRY} and is not listed in DEVICE_FUNCTIONS")
    return problems


# ------------------------------------------------------------------------------------------ compiling
@dataclass
class Compiled:
    case: Case
    arch: int
    variant: str  # the autotune config, "" for a plain kernel
    num_warps: int
    ttir: str
    ptx: str
    cubin: bytes
    ptxas_log: str
    shared: int  # dynamic shared memory per CTA, bytes (Triton's metadata)
    seconds: float

    def _cuobjdump(self, *flags: str) -> str:
        from triton import knobs

        with tempfile.TemporaryDirectory() as d:
            path = Path(d, "kernel.cubin")
            path.write_bytes(self.cubin)
            return subprocess.run([knobs.nvidia.cuobjdump.path, *flags, str(path)], check=True,
                                  capture_output=True, text=True).stdout

    def sass(self) -> str:
        """The cubin's SASS (`cuobjdump --dump-sass`, the one bundled with triton)."""
        return self._cuobjdump("--dump-sass")

    def static_smem(self) -> int:
        """Static shared memory per CTA, bytes (`cuobjdump -res-usage`: SHARED)."""
        m = re.search(r"SHARED:(\d+)", self._cuobjdump("-res-usage"))
        return int(m.group(1)) if m else 0


def _constexpr_params(jit) -> list[str]:
    return [p.name for p in jit.params if p.is_constexpr]


def variants(kernel: Kernel, case: Case, quick: bool = False) -> list[tuple[str, dict, dict]]:
    """(label, constexprs, compile options) per compiled variant of `case`: one, or one per autotune config
    (`quick`: the first, which is also the interpreter's fixed config)."""
    if case.tuned != (kernel.autotuner is not None):
        raise ValueError(f"case {case.label!r} says tuned={case.tuned}, but {kernel.name} is "
                         f"{'' if kernel.autotuner is not None else 'not '}autotuned; fix {REGISTRY}")
    base = dict(num_warps=case.num_warps, num_stages=case.num_stages)
    if kernel.autotuner is None:
        return [("", dict(case.constexprs), base)]
    out = []
    for cfg in kernel.autotuner.configs[:1] if quick else kernel.autotuner.configs:
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.maxnreg is not None:
            opts["maxnreg"] = cfg.maxnreg
        label = " ".join([f"{k}={v}" for k, v in cfg.kwargs.items()] + [f"warps={cfg.num_warps}"])
        out.append((f"[autotune {label}]", {**case.constexprs, **cfg.kwargs}, opts))
    return out


def check_case_arguments(kernel: Kernel, case: Case, constexprs: Mapping[str, object]) -> None:
    """ValueError naming what is missing or unknown when a case does not list exactly the kernel's arguments."""
    args, consts = list(kernel.jit.arg_names), set(_constexpr_params(kernel.jit))
    defaults = {p.name for p in kernel.jit.params if p.is_constexpr and p.has_default}
    given = {**constexprs, **case.specialized}
    missing = [a for a in args if a not in case.signature and a not in given
               and not (a in consts and a in defaults)]
    unknown = [a for a in list(case.signature) + list(given) if a not in args]
    wrong_kind = [a for a in list(case.signature) + list(case.specialized) if a in consts] + \
        [a for a in constexprs if a in args and a not in consts]
    if missing or unknown or wrong_kind:
        raise ValueError(f"case {case.label!r} does not match {kernel.name}{tuple(args)}: missing {missing}, "
                         f"unknown {unknown}, constexpr/runtime mix-up {wrong_kind}; fix {REGISTRY}")


@contextlib.contextmanager
def _ptxas_log():
    """Capture the `ptxas -v` log Triton prints when TRITON_DUMP_PTXAS_LOG is on (same flags as the real build)."""
    from triton import knobs

    buf = io.StringIO()
    old = getattr(knobs.nvidia, "dump_ptxas_log", None)
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        knobs.nvidia.dump_ptxas_log = old


def _ptxas_v(ptx: str, arch: int) -> str:
    """`ptxas -v` of Triton's bundled ptxas on `ptx`: for a triton that does not print its own ptxas log."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "kernel.ptx")
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([knobs.nvidia.ptxas.path, "-v", "-lineinfo", f"--gpu-name={gpu}", str(src), "-o",
                            str(Path(d, "kernel.o"))], capture_output=True, text=True)
    return r.stderr


def compile_case(kernel: Kernel, case: Case, arch: int, variant: tuple[str, dict, dict] | None = None) -> Compiled:
    """Compile one variant of `case` for sm_<arch> (raises what Triton raises on failure)."""
    require_compile_mode()
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel.jit, JITFunction):
        raise RuntimeError(f"{kernel.name} was imported under the interpreter (TRITON_INTERPRET=1): compile in a "
                           "process that sets TRITON_INTERPRET=0 before importing triton")
    label, constexprs, opts = variant or variants(kernel, case)[0]
    check_case_arguments(kernel, case, constexprs)
    jit = kernel.jit
    defaults = {p.name: p.default for p in jit.params if p.is_constexpr and p.has_default and p.name not in constexprs}
    constexprs = {**defaults, **constexprs, **case.specialized}  # Triton compiles an int passed as 1 as a constant
    signature = {a: ("constexpr" if a in constexprs else case.signature[a]) for a in jit.arg_names}
    aligned = [a for a, t in case.signature.items() if t.startswith("*")] + list(case.aligned_ints)
    attrs = {(jit.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    t0 = time.perf_counter()
    old_always = knobs.compilation.always_compile
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    try:
        with _ptxas_log() as log:
            k = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options=opts)
    finally:
        knobs.compilation.always_compile = old_always
    ptxas_log = log.getvalue()
    if "registers" not in ptxas_log:  # this triton ignored TRITON_DUMP_PTXAS_LOG
        ptxas_log = _ptxas_v(k.asm["ptx"], arch)
    return Compiled(case, arch, label, opts["num_warps"], k.asm["ttir"], k.asm["ptx"], k.asm["cubin"], ptxas_log,
                    int(k.metadata.shared), time.perf_counter() - t0)


def registry_cases(quick: bool, only: str = "") -> list[Case]:
    from tools.triton_cases import cases
    return [c for c in cases() if (c.ci or not quick) and c.kernel.startswith(only)]


def _same_type(case_type: str, launch_type: str) -> bool:
    if case_type.startswith("fp") and not launch_type.startswith("*"):
        return launch_type == "fp32"  # a Python float reaches the kernel as fp32 whatever the case says
    if case_type in ("i32", "i64"):
        return launch_type in ("i32", "i64")  # the launcher picks the width from the value
    return case_type == launch_type


TUNED_CONSTEXPRS = ("ROWS",)  # what kernels.tiling.tuned's configs set (with num_warps)


def find_case(cases: Iterable[Case], launch: Mapping) -> Case | None:
    """The case describing a recorded launch (`tools.triton_bytes.Launch` as a dict): same kernel, constexprs
    and num_warps (for a tuned case: the untuned constexprs; the interpreter runs the first config), same
    argument types. The interpreter specialises nothing: a case's `specialized` integers are runtime
    arguments of the launch, which must pass 1 for each."""
    consts, types, ints = launch["constexprs"], launch["arg_types"], launch.get("ints", {})
    for c in cases:
        if c.kernel != launch["kernel"] or set(c.signature) | set(c.specialized) != set(types):
            continue
        if any(ints.get(n) != v for n, v in c.specialized.items()):
            continue
        got = {k: v for k, v in consts.items() if not (c.tuned and k in TUNED_CONSTEXPRS)}
        if got != dict(c.constexprs) or (not c.tuned and c.num_warps != launch["num_warps"]):
            continue
        if all(_same_type(t, types[a]) for a, t in c.signature.items()):
            return c
    return None


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="only the representative subset (ci=True cases, first autotune config)")
    ap.add_argument("--only", default="", metavar="PREFIX", help="only kernels whose name starts with PREFIX")
    ap.add_argument("--arch", type=int, action="append", help=f"compute capability, repeatable (default {ARCHS})")
    ap.add_argument("--stats", action="store_true", help="print ptxas -v registers / spills and shared memory")
    ap.add_argument("--out", type=Path, help="write each case's PTX here")
    args = ap.parse_args(argv)
    require_compile_mode()
    import triton

    archs = args.arch or list(ARCHS)
    kernels = discover(kernel_modules())
    todo = registry_cases(args.quick, args.only)
    from tools.triton_cases import cases as all_cases
    problems = coverage_problems({n: k.source for n, k in kernels.items()}, {c.kernel for c in all_cases()},
                                 DEVICE_FUNCTIONS, host_launches(kernels, package_roots()))
    print(f"triton {triton.__version__}: {len(kernels)} @triton.jit functions in {PACKAGE}, "
          f"{len(todo)} cases ({'quick subset' if args.quick else 'all'}), targets "
          f"{', '.join(f'sm_{a}' for a in archs)}", flush=True)
    failures = compiled = 0
    for arch in archs:
        for case in todo:
            if case.kernel not in kernels:
                continue  # reported by coverage_problems
            try:
                todo_variants = variants(kernels[case.kernel], case, args.quick)
            except ValueError as e:
                failures += 1
                print(f"FAIL sm_{arch} {case.label}: {e}", flush=True)
                continue
            for variant in todo_variants:
                name = f"sm_{arch} {case.label} {variant[0]}".strip()
                try:
                    c = compile_case(kernels[case.kernel], case, arch, variant)
                except Exception as e:  # noqa: BLE001 - report every failure and keep going
                    failures += 1
                    print(f"FAIL {name}: {type(e).__name__}: {str(e)[:3000]}", flush=True)
                    continue
                compiled += 1
                info = ""
                if args.stats:
                    s = parse_ptxas_log(c.ptxas_log)
                    info = (f" regs={s.registers} spills={s.spill_stores}+{s.spill_loads}B stack={s.stack_frame}B "
                            f"smem={c.shared}B warps={c.num_warps}")
                print(f"OK   {name} ({c.seconds:.1f}s){info}", flush=True)
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / (re.sub(r"[^\w=.-]+", "_", name) + ".ptx")).write_text(c.ptx)
    for p in problems:
        print(f"COVERAGE {p}")
    print(f"{compiled} compiled, {failures} failed, {len(problems)} coverage problem(s)")
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
