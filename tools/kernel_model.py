"""Static performance report of every Triton kernel at the issue sizes, without a GPU (issue #16 §2).

    python -m tools.kernel_model                 # S=12, T=2, B=64, K=65536; each workload's dtypes; sm_90
    python -m tools.kernel_model --arch 80       # the same for A100

NOTHING HERE RAN ON A GPU AND NOTHING IS TIMED: every number is a compile-time fact of the sm_XX cubin or a
byte count under the Triton interpreter. Per kernel launch of the host entry points in
`tools/triton_cases.WORKLOADS` (ce_rows as the fused op calls it, the per-logits dino_cross_entropy on the
Triton backend, teacher_rows in every centering mode, teacher_distribution, the
augmentation), one row with
  * registers, spills (bytes: spill stores + spill loads), stack: `ptxas -v` of Triton's own compile (same
    flags as on a GPU) for the registry case matching the launch (kernel, constexprs, pointer dtypes,
    num_warps; a launch with no matching case is an error: the registry must describe what the host
    really launches); an autotuned kernel has one row per autotune config;
  * ctas_per_sm (and what limits it): the occupancy rules from registers, warps and shared memory
    (`tools/kernel_static.ctas_per_sm`); grid: the launch's grid on that GPU (132 SMs for sm_90, 108 for
    sm_80), planned by `kernels.tiling.column_plan(..., sm_count=...)` for the launch's sizes at B;
    grid_ctas_per_sm: its CTAs over the SMs (below 1: SMs sit idle);
  * fences_in_loop: MEMBAR / FENCE / ERRBAR / CCTL.IVALL instructions between a backward branch's target
    and the branch in the cubin's SASS; `streaming` = a loop of the kernel loads from global memory;
  * bytes_moved: bytes the programs load, store and update atomically per call, counted under the Triton
    interpreter with the GPU's tiling (`tools/triton_bytes`): the distinct addresses of each executed
    instruction, so a re-read by a later instruction counts again; bytes_min: the distinct addresses
    behind them over the call (inputs read once, outputs written once).
The interpreter runs each host op at a few small batches (`Workload.batches`: 3-5 for the student's S*B
rows, 4 and 8 for the teacher's T*B; B = 64 would take hours on a CPU): every count is fitted as a + b B by
least squares and evaluated at B; `count_fit_residual` is the fit's largest relative residual (tile
padding: a partly filled tile still loads its [K] vectors), above 5% an error. What the plan for so few
rows does differently from B = 64, and so is counted differently: pass 1 splits K into 512-column
ranges instead of 2048 (its [5, ranges, rows] fp32 partials, 20 bytes per row and range, under 1% of a
row's bytes at K = 65536, counted 4x too large), and the teacher's passes have 1 row group instead of 3
(each group's [K]-vector reads and [K] partial outputs, 256 KiB apiece, counted once instead of 3 times:
a few % of a teacher launch's bytes). Every other byte is per row and exact.

Targets (issue #16 §2): no spills; no fences inside loops; at least 2 CTAs per SM for the streaming
kernels; bytes_moved within 1.3x of bytes_min. The `misses` column names each target a row misses.

The result is a function of the source code, not of a machine: bench/results/kernel_model.csv is
rewritten whole (stamped with the date, versions and `basis`, which says the above), and kernel_model.png
plots bytes_moved/bytes_min and CTAs per SM per row. Runs on CPU in under an hour (`make kernel-model`).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.harness import RESULTS_DIR, environment_stamp, format_table

ROOT = Path(__file__).resolve().parents[1]
TARGETS = dict(max_spills=0, max_fences_in_loop=0, min_ctas_streaming=2, max_bytes_ratio=1.3)
COLUMNS = ("kernel", "impl", "dtype", "workload", "variant", "num_warps", "grid", "grid_ctas_per_sm",
           "launches_per_call", "registers", "spills", "stack", "smem_bytes", "ctas_per_sm", "ctas_limit", "streaming",
           "fences_in_loop", "fence_kinds", "atomic_sem", "bytes_moved", "bytes_min", "bytes_ratio",
           "count_fit_residual", "misses")


BASIS = ("static, no GPU run and no timing: registers/spills/fences from ptxas -v and the SASS of Triton's "
         "compile for the target; bytes counted under the Triton interpreter; grid planned for the target's SMs")
_BYTES = {"*fp32": 4, "*bf16": 2, "*fp16": 2}
# Which kernels.tiling grid each column-tiled kernel is launched on (the launch sites in ce_rows.py / teacher.py).
PLAN_GRID = {"ce_rows._ce_partials_kernel": "stats", "teacher._teacher_partials_kernel": "stats",
             "ce_rows._ce_grad_kernel": "stream", "teacher._teacher_probs_kernel": "stream",
             "teacher._column_lse_kernel": "columns"}
FINISH_KERNELS = ("ce_rows._ce_finish_kernel", "teacher._teacher_finish_kernel")


def count_bytes(S: int, T: int, K: int, sms: int, dtypes=None, workloads=None) -> list[dict]:
    """Run `tools.triton_bytes` in a subprocess (TRITON_INTERPRET=1 must precede its triton import), launches
    planned for a GPU with `sms` SMs, each workload at its own batches (`tools.triton_cases.Workload`)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "launches.json")
        cmd = [sys.executable, "-m", "tools.triton_bytes", "--json", str(out), "--S", str(S), "--T", str(T),
               "--K", str(K), "--sms", str(sms)]
        if dtypes:
            cmd += ["--dtypes", *dtypes]
        if workloads:
            cmd += ["--workloads", *workloads]
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return json.loads(out.read_text())


def _launch_key(launch: dict) -> tuple:
    """Launches of one configuration within a call are summed into one row; the augmentation's crop sizes
    (H, W) stay apart (one row per size)."""
    sizes = tuple(launch.get("ints", {}).get(a) for a in ("H", "W"))
    return (launch["kernel"], json.dumps(launch["constexprs"], sort_keys=True), launch["num_warps"],
            json.dumps(launch["arg_types"], sort_keys=True), sizes)


COUNTED = ("loaded", "stored", "atomic", "loaded_unique", "stored_unique", "atomic_unique")


def group_launches(runs: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{(workload, dtype, launch key): {B: summed counts, launch count, grid, semantics}}."""
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for run in runs:
        for launch in run["launches"]:
            key = (run["workload"], run["dtype"], _launch_key(launch))
            g = groups[key].setdefault(run["B"], dict({c: 0 for c in COUNTED}, launches=0, grid=launch["grid"],
                                                      sems=set(), sample=launch))
            for c in COUNTED:
                g[c] += launch[c]
            g["launches"] += 1
            g["sems"].update(launch["atomic_sems"])
    return groups


FIT_TOLERANCE = 0.05  # largest relative residual of the a + b B fit before the counts are called not affine


def fit_affine(values: dict[int, int]) -> tuple[float, float, float]:
    """(a, b, largest relative residual) of the least-squares a + b B through the counted batches. Counts are
    affine in B up to tile padding: a tile whose rows are not all valid still loads its [K] vectors."""
    xs = sorted(values)
    n, mx, my = len(xs), sum(xs) / len(xs), sum(values[x] for x in xs) / len(xs)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (values[x] - my) for x in xs) / var if var else 0.0
    a = my - b * mx
    residual = max(abs(a + b * x - values[x]) / max(abs(values[x]), 1) for x in xs) if n > 1 else 0.0
    return a, b, residual


def extrapolate(values: dict[int, int], B: int) -> int:
    """The count at batch B from the fit of `fit_affine`; ValueError if it is off by more than FIT_TOLERANCE."""
    a, b, residual = fit_affine(values)
    if residual > FIT_TOLERANCE:
        raise ValueError(f"count not affine in B: {values} (largest relative residual {residual:.3f})")
    return round(a + b * B)


def gpu_grid(launch: dict, n_rows: int, sms: int) -> list[int]:
    """The grid of a column-tiled or finish kernel's launch on a GPU with `sms` SMs, for `n_rows` rows."""
    from dinovmf.kernels import tiling

    if launch["kernel"] in FINISH_KERNELS:
        return [-(-n_rows // tiling.FINISH_BLOCK_R)]
    data = launch["arg_types"].get("L") or launch["arg_types"]["D"]
    plan = tiling.column_plan(n_rows, launch["ints"]["K"], "cpu", _BYTES[data], sm_count=sms)
    return list(getattr(plan, PLAN_GRID[launch["kernel"]]).grid)


def _summarise(points: dict[int, dict], B: int, sms: int) -> dict:
    counts = {c: extrapolate({b: p[c] for b, p in points.items()}, B) for c in COUNTED}
    residual = max(fit_affine({b: p[c] for b, p in points.items()})[2] for c in COUNTED)
    launches = {p["launches"] for p in points.values()}
    if len(launches) != 1:
        raise ValueError(f"launches per call change with B: {sorted(launches)}")
    n = launches.pop()
    sample = next(iter(points.values()))
    launch = sample["sample"]
    if launch["kernel"] in PLAN_GRID or launch["kernel"] in FINISH_KERNELS:
        n_rows = extrapolate({b: p["sample"]["ints"]["n_rows"] for b, p in points.items()}, B)
        grid = gpu_grid(launch, n_rows, sms)
    else:  # the vMF bias ([K] blocks) and the augmentation ((crops, pixel blocks)): as launched, crops at B
        grid = [extrapolate({b: p["grid"][0] for b, p in points.items()}, B)] + list(sample["grid"][1:])
    return dict(launches=n, grid=grid, residual=residual,
                moved=(counts["loaded"] + counts["stored"] + counts["atomic"]) / n,
                minimum=(counts["loaded_unique"] + counts["stored_unique"] + counts["atomic_unique"]) / n,
                sems=sorted(set().union(*(p["sems"] for p in points.values()))), sample=sample["sample"])


def misses(row: dict) -> list[str]:
    out = []
    if row["spills"] > TARGETS["max_spills"]:
        out.append("spills")
    if row["fences_in_loop"] > TARGETS["max_fences_in_loop"]:
        out.append("fences in loop")
    if row["streaming"] and row["ctas_per_sm"] < TARGETS["min_ctas_streaming"]:
        out.append("<2 CTAs/SM")
    if row["bytes_ratio"] > TARGETS["max_bytes_ratio"]:
        out.append("bytes >1.3x min")
    return out


def static_rows(groups, B: int, arch: int) -> tuple[list[dict], list[str]]:
    """One report row per (workload, dtype, launch configuration [, autotune config]); and the errors. A
    configuration the host launches only at the smallest counted batches (one row group where larger
    batches get several: the bias gradient summed in place instead of per group) is not one it launches
    at B, and is left out: from B = 3 (36 student rows) the fused op's gradient pass has its B = 64 row-group
    count (3 on 132 SMs), so its per-group bias-gradient sums are counted as at B = 64."""
    largest = {}
    for (workload, dtype, _), points in groups.items():
        largest[workload, dtype] = max(largest.get((workload, dtype), 0), *points)
    from tools import kernel_static as ks
    from tools import triton_aot as aot

    kernels = aot.discover(aot.kernel_modules())
    cases = aot.registry_cases(quick=False)
    sm = ks.SM90 if arch == 90 else ks.SM80
    rows, errors, compiled = [], [], {}
    for (workload, dtype, _), points in sorted(groups.items()):
        if largest[workload, dtype] not in points:
            continue
        try:
            s = _summarise(points, B, sm.sms)
        except ValueError as e:
            errors.append(f"{workload} {dtype} {next(iter(points.values()))['sample']['kernel']}: {e}")
            continue
        launch = s["sample"]
        kernel = kernels.get(launch["kernel"])
        case = aot.find_case(cases, launch)
        if kernel is None or case is None:
            errors.append(f"{workload} {dtype}: launch of {launch['kernel']} with constexprs {launch['constexprs']}, "
                          f"num_warps {launch['num_warps']}, arguments {launch['arg_types']} has no case in "
                          f"{aot.REGISTRY}")
            continue
        for variant in aot.variants(kernel, case):
            key = (id(case), variant[0], arch)  # cases hold dicts: not hashable
            if key not in compiled:
                compiled[key] = aot.compile_case(kernel, case, arch, variant)
            c = compiled[key]
            stats = ks.parse_ptxas_log(c.ptxas_log)
            smem = c.shared + c.static_smem()
            ctas, limit = ks.ctas_per_sm(stats.registers, c.num_warps, smem, sm)
            fences = ks.fences_in_loops(c.sass())
            row = dict(kernel=case.kernel, impl="triton", dtype=dtype, workload=workload,
                       variant=" ".join(x for x in (case.label.removeprefix(case.kernel).strip(), variant[0],
                                                    _crop_size(launch)) if x),
                       num_warps=c.num_warps, grid="x".join(map(str, s["grid"])),
                       grid_ctas_per_sm=round(math.prod(s["grid"]) / sm.sms, 2), launches_per_call=s["launches"],
                       registers=stats.registers, spills=stats.spills, stack=stats.stack_frame, smem_bytes=smem,
                       ctas_per_sm=ctas, ctas_limit=limit, streaming=fences.streaming,
                       fences_in_loop=fences.count, fence_kinds=" ".join(fences.kinds) or "-",
                       atomic_sem=" ".join(s["sems"]) or "-", bytes_moved=int(s["moved"]),
                       bytes_min=int(s["minimum"]), bytes_ratio=round(s["moved"] / s["minimum"], 3),
                       count_fit_residual=round(s["residual"], 4))
            row["misses"] = "; ".join(misses(row)) or "none"
            rows.append(row)
    return rows, errors


def _crop_size(launch: dict) -> str:
    ints = launch.get("ints", {})
    return f"{ints['H']}x{ints['W']}px" if "H" in ints else ""


def write_csv(path: Path, rows: list[dict], extra: dict) -> None:
    """Rewrite `path` atomically with `rows` (+ the `extra` columns on every row)."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS) + list(extra))
        w.writeheader()
        w.writerows({**r, **extra} for r in rows)
    os.replace(tmp, path)


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['kernel'].split('.')[-1]} {r['variant']} [{r['workload']}]" for r in rows]
    colors = ["tab:blue" if r["dtype"] == "float32" else "tab:orange" for r in rows]
    y = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(17, 0.32 * len(rows) + 1.6), sharey=True,
                               gridspec_kw=dict(width_ratios=(3, 2)))
    a.barh(y, [r["bytes_ratio"] for r in rows], color=colors)
    a.axvline(TARGETS["max_bytes_ratio"], color="k", ls="--", lw=1, label="target 1.3x")
    a.set_xlabel("bytes moved / bytes min (per call)")
    a.set_yticks(list(y), labels, fontsize=7)
    a.invert_yaxis()
    a.legend(fontsize=8)
    b.barh(y, [r["ctas_per_sm"] for r in rows], color=colors)
    b.axvline(TARGETS["min_ctas_streaming"], color="k", ls="--", lw=1, label="target 2 (streaming)")
    for i, r in enumerate(rows):
        b.text(r["ctas_per_sm"] + 0.1, i, f"{r['registers']} regs, {r['num_warps']} warps"
               + (f", {r['spills']} B spilled" if r["spills"] else "")
               + (f", {r['fences_in_loop']} fences in loop" if r["fences_in_loop"] else ""), va="center", fontsize=6)
    b.set_xlabel("CTAs per SM (blue: fp32 data, orange: bf16 / uint8)")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, default=12)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--K", type=int, default=65536)
    ap.add_argument("--arch", type=int, default=90, choices=(90, 80))
    ap.add_argument("--dtypes", nargs="+", help="data dtypes (default: each workload's own)")
    ap.add_argument("--workloads", nargs="*", help="a subset of tools/triton_cases.WORKLOADS by name")
    ap.add_argument("--name", default="kernel_model", help="results file stem")
    ap.add_argument("--results-dir", type=Path, default=Path(os.environ.get("DINOVMF_BENCH_RESULTS") or RESULTS_DIR))
    args = ap.parse_args(argv)
    from tools.triton_aot import require_compile_mode
    require_compile_mode()  # this process compiles; the byte count runs under the interpreter in a subprocess
    from tools.kernel_static import SM80, SM90
    runs = count_bytes(args.S, args.T, args.K, (SM90 if args.arch == 90 else SM80).sms, args.dtypes, args.workloads)
    rows, errors = static_rows(group_launches(runs), args.B, args.arch)
    import triton
    stamp = environment_stamp("cpu")
    extra = dict(target=f"sm_{args.arch} (static: compiled on {stamp['device']}, no GPU)", basis=BASIS, S=args.S,
                 T=args.T, B=args.B, K=args.K, triton=triton.__version__, torch=stamp["torch"], date=stamp["date"])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.results_dir / f"{args.name}.csv"
    if rows:
        print(format_table(rows, [c for c in COLUMNS if c not in ("impl", "launches_per_call", "stack")]))
        write_csv(csv_path, rows, extra)
        plot(csv_path.with_suffix(".png"), rows, f"Triton kernels, STATIC model for sm_{args.arch} at S={args.S} "
             f"T={args.T} B={args.B} K={args.K} (triton {triton.__version__}, {stamp['date']}): compile-time facts "
             "and interpreter byte counts, no GPU run, no timing\ntargets: no spills, no fences in loops, "
             ">=2 CTAs/SM when streaming, bytes <= 1.3x min")
        missed = [r for r in rows if r["misses"] != "none"]
        print(f"\n{len(rows)} rows -> {csv_path} and {csv_path.with_suffix('.png')}; "
              f"{len(missed)} miss a target:")
        for r in missed:
            print(f"  {r['kernel']} {r['variant']} {r['dtype']} [{r['workload']}]: {r['misses']}")
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
