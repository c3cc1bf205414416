"""Static performance report of every Triton kernel at the issue sizes, without a GPU (issue #16 §2).

    python -m bench.kernel_model                 # S=12, T=2, B=64, K=65536; fp32 and bf16; sm_90
    python -m bench.kernel_model --arch 80       # the same for A100

Per kernel launch of the host ops in `tools/triton_cases.WORKLOADS` (fused CE forward/backward, teacher
in every centering mode, Sinkhorn, the vMF column bias), one row with
  * registers, spills (bytes: spill stores + spill loads), stack: `ptxas -v` of Triton's own compile (same flags as on a GPU) for the
    registry case matching the launch (kernel, constexprs, pointer dtypes, num_warps; a launch with no
    matching case is an error: the registry must describe what the host really launches);
  * ctas_per_sm (and what limits it): the sm_90 occupancy rules from registers, warps and shared memory
    (`tools/kernel_static.ctas_per_sm`); grid_ctas_per_sm: the launch's CTAs over the 132 SMs of an
    H100 SXM / H200 (below 1: SMs sit idle);
  * fences_in_loop: MEMBAR / FENCE / ERRBAR / CCTL.IVALL instructions between a backward branch's target
    and the branch in the cubin's SASS; `streaming` = a loop of the kernel loads from global memory;
  * bytes_moved: bytes the programs load, store and update atomically per call, with the repeats,
    counted under the Triton interpreter (`tools/triton_bytes`); bytes_min: the distinct addresses
    behind them (inputs read once, outputs written once).
The interpreter runs the host ops at B = 1, 2 and 3 (B = 64 would take half an hour on a CPU): every
count is fitted as a + b B on B = 1, 2, the fit is checked exactly at B = 3, then evaluated at B.

Targets (issue #16 §2): no spills; no fences inside loops; at least 2 CTAs per SM for the streaming
kernels; bytes_moved within 1.3x of bytes_min. The `misses` column names each target a row misses.
Triton kernels only: the CUDA twin (csrc/*.cu) is being retired (issue #14), so it has no rows.

The result is a function of the source code, not of a machine: bench/results/kernel_model.csv is
rewritten whole (stamped with the date and versions), and kernel_model.png plots bytes_moved/bytes_min
and CTAs per SM per row. Runs on CPU in a few minutes.
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
COUNT_BATCHES = (1, 2)
CHECK_BATCH = 3
COLUMNS = ("kernel", "impl", "dtype", "workload", "variant", "num_warps", "grid", "grid_ctas_per_sm",
           "launches_per_call", "registers", "spills", "stack", "smem_bytes", "ctas_per_sm", "ctas_limit", "streaming",
           "fences_in_loop", "fence_kinds", "atomic_sem", "bytes_moved", "bytes_min", "bytes_ratio", "misses")


def count_bytes(S: int, T: int, K: int, batches, dtypes, workloads=None) -> list[dict]:
    """Run `tools.triton_bytes` in a subprocess (TRITON_INTERPRET=1 must precede its triton import)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "launches.json")
        cmd = [sys.executable, "-m", "tools.triton_bytes", "--json", str(out), "--S", str(S), "--T", str(T),
               "--K", str(K), "--batches", *map(str, batches), "--dtypes", *dtypes]
        if workloads:
            cmd += ["--workloads", *workloads]
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return json.loads(out.read_text())


def _launch_key(launch: dict) -> tuple:
    return (launch["kernel"], json.dumps(launch["constexprs"], sort_keys=True), launch["num_warps"],
            json.dumps(launch["arg_types"], sort_keys=True))


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


def extrapolate(values: dict[int, int], B: int, check_batch: int | None) -> int:
    """a + b*B fitted on the two smallest batches; ValueError if `check_batch` is off the line."""
    b1, b2 = sorted(values)[:2]
    slope = (values[b2] - values[b1]) / (b2 - b1)
    predict = lambda x: values[b1] + slope * (x - b1)  # noqa: E731
    if check_batch is not None and check_batch in values and predict(check_batch) != values[check_batch]:
        raise ValueError(f"count not affine in B: {values} (predicted {predict(check_batch)} at B={check_batch})")
    return round(predict(B))


def _summarise(points: dict[int, dict], B: int, check_batch: int | None) -> dict:
    counts = {c: extrapolate({b: p[c] for b, p in points.items()}, B, check_batch) for c in COUNTED}
    launches = {p["launches"] for p in points.values()}
    if len(launches) != 1:
        raise ValueError(f"launches per call change with B: {sorted(launches)}")
    n = launches.pop()
    grid0 = extrapolate({b: p["grid"][0] for b, p in points.items()}, B, check_batch)
    sample = next(iter(points.values()))
    return dict(launches=n, grid=[grid0] + list(sample["grid"][1:]),
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


def static_rows(groups, B: int, arch: int, check_batch: int | None) -> tuple[list[dict], list[str]]:
    """One report row per (workload, dtype, launch configuration [, autotune config]); and the errors."""
    from tools import kernel_static as ks
    from tools import triton_aot as aot

    kernels = aot.discover(aot.kernel_modules())
    cases = aot.registry_cases(quick=False)
    sm = ks.SM90 if arch == 90 else ks.SM80
    rows, errors, compiled = [], [], {}
    for (workload, dtype, _), points in sorted(groups.items()):
        s = _summarise(points, B, check_batch)
        launch = s["sample"]
        kernel = kernels.get(launch["kernel"])
        case = aot.find_case(cases, launch, autotuned=kernel is not None and kernel.autotuner is not None)
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
                       variant=(case.label.removeprefix(case.kernel).strip() + " " + variant[0]).strip(),
                       num_warps=c.num_warps, grid="x".join(map(str, s["grid"])),
                       grid_ctas_per_sm=round(math.prod(s["grid"]) / sm.sms, 2), launches_per_call=s["launches"],
                       registers=stats.registers, spills=stats.spills, stack=stats.stack_frame, smem_bytes=smem,
                       ctas_per_sm=ctas, ctas_limit=limit, streaming=fences.streaming,
                       fences_in_loop=fences.count, fence_kinds=" ".join(fences.kinds) or "-",
                       atomic_sem=" ".join(s["sems"]) or "-", bytes_moved=int(s["moved"]),
                       bytes_min=int(s["minimum"]), bytes_ratio=round(s["moved"] / s["minimum"], 3))
            row["misses"] = "; ".join(misses(row)) or "none"
            rows.append(row)
    return rows, errors


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
    b.set_xlabel("CTAs per SM (blue fp32, orange bf16)")
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
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--workloads", nargs="*", help="a subset of tools/triton_cases.WORKLOADS by name")
    ap.add_argument("--name", default="kernel_model", help="results file stem")
    ap.add_argument("--results-dir", type=Path, default=Path(os.environ.get("DINOVMF_BENCH_RESULTS") or RESULTS_DIR))
    args = ap.parse_args(argv)
    from tools.triton_aot import require_compile_mode
    require_compile_mode()  # this process compiles; the byte count runs under the interpreter in a subprocess
    batches = COUNT_BATCHES if args.B in COUNT_BATCHES else COUNT_BATCHES + (CHECK_BATCH,)
    runs = count_bytes(args.S, args.T, args.K, batches, args.dtypes, args.workloads)
    rows, errors = static_rows(group_launches(runs), args.B, args.arch, CHECK_BATCH)
    import triton
    stamp = environment_stamp("cpu")
    extra = dict(target=f"sm_{args.arch} (static: compiled on {stamp['device']}, no GPU)", S=args.S, T=args.T,
                 B=args.B, K=args.K, triton=triton.__version__, torch=stamp["torch"], date=stamp["date"])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.results_dir / f"{args.name}.csv"
    if rows:
        print(format_table(rows, [c for c in COLUMNS if c not in ("impl", "launches_per_call", "stack")]))
        write_csv(csv_path, rows, extra)
        plot(csv_path.with_suffix(".png"), rows, f"Triton kernels, static model for sm_{args.arch} at S={args.S} "
             f"T={args.T} B={args.B} K={args.K} (triton {triton.__version__}, {stamp['date']}); targets: no spills, "
             "no fences in loops, >=2 CTAs/SM when streaming, bytes <= 1.3x min")
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
