"""The shared benchmark harness: timing, peak memory, and recording results as table + CSV + PNG.

Every benchmark in `bench/` measures with `timeit` / `peak_memory` and hands its rows to `record`,
which prints an aligned table, appends the rows to `bench/results/<name>.csv` stamped with the device,
library versions and date (so results from a laptop and an H100 can live in one file and never be
confused), and plots this run's rows to `bench/results/<name>.png`.

Benchmarks are never timed assertions in tests: numbers go to results, correctness goes to tests.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Columns `record` adds to every row; a row may not use these names itself.
STAMP_COLUMNS = ("device", "torch", "triton", "date")


# --------------------------------------------------------------------------------------------------
# Environment stamp
# --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    """CPU model from /proc/cpuinfo (Linux) or `platform`, with the number of usable cores."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if not model:
        import platform
        model = platform.processor() or platform.machine() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable name of the device a benchmark ran on.

    `device=None` means "the GPU if there is one, else the CPU": the same rule the benchmarks use to
    pick where they run.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not available" here
        return ""
    return getattr(triton, "__version__", "")


def environment_stamp(device: torch.device | str | None = None) -> dict[str, str]:
    """The columns `record` appends to every row: device, torch, triton (empty if absent), date (UTC)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def _wants_cuda_sync(sync: bool | None) -> bool:
    if sync is None:
        return torch.cuda.is_available() and torch.cuda.is_initialized()
    return bool(sync) and torch.cuda.is_available()


def timeit(fn: Callable[[], object], warmup: int = 3, iters: int = 10, sync: bool | None = None) -> float:
    """Median wall time of `fn()` in milliseconds.

    On a GPU (`sync=True`, or `sync=None` with CUDA initialised) each call is timed with CUDA events
    so that the asynchronous launch is not what gets measured; on CPU with `time.perf_counter`.
    The median rather than the mean: one preempted iteration on a shared machine should not move it.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    use_cuda = _wants_cuda_sync(sync)  # after warm-up: fn's first call may be what initialises CUDA
    times_ms = []
    if use_cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times_ms)


def _cpu_peak_bytes_from_profiler(prof) -> float:
    """Peak of the running sum of the profiler's allocation records ([memory] events), in bytes.

    The profiler attributes each allocation (+nbytes) and free (-nbytes) to a timestamp; replaying
    them in order gives the high-water mark of memory allocated *during* `fn` (tensors that existed
    before do not count, as with `max_memory_allocated - memory_allocated` on CUDA).
    """
    records = []
    for ev in prof.profiler.kineto_results.events():
        if ev.name() == "[memory]" and ev.device_type() == torch.autograd.DeviceType.CPU:
            records.append((ev.start_ns(), ev.nbytes()))
    if not records:
        return math.nan
    records.sort(key=lambda r: r[0])
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return float(peak)


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Peak extra memory, in bytes, that one call of `fn()` allocates through torch.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak, minus what was allocated before.
    CPU: `tracemalloc` cannot see torch's allocator, so the torch profiler's memory records are
    replayed (see `_cpu_peak_bytes_from_profiler`); returns NaN if the profiler recorded nothing
    (e.g. a build without Kineto), never a made-up number.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return _cpu_peak_bytes_from_profiler(prof)
    except Exception:  # noqa: BLE001 - the profiler's internals vary across torch builds
        return math.nan


# --------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict], columns: Iterable[str]) -> str:
    """Rows as an aligned text table (floats to 4 significant digits)."""
    columns = list(columns)
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows; if the new rows bring columns the file lacks, rewrite it with the union of columns."""
    new_cols = []
    for r in rows:
        new_cols += [c for c in r if c not in new_cols]
    old_rows: list[dict] = []
    old_cols: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_cols = list(reader.fieldnames or [])
            if any(c not in old_cols for c in new_cols):
                old_rows = list(reader)
    columns = old_cols + [c for c in new_cols if c not in old_cols]
    rewrite = not old_cols or columns != old_cols
    mode = "w" if rewrite else "a"
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if rewrite:
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows(rows)


def _plot(path: Path, rows: list[dict], x: str, y: str, group: str | None, title: str,
          logx: bool, logy: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    groups: dict[object, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[group] if group else y, []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, grows in groups.items():
        pts = sorted(((float(r[x]), float(r[y])) for r in grows), key=lambda t: t[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(label))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if group:
        ax.legend(title=group, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record(name: str, rows: list[dict], x: str, y: str, group: str | None = None,
           title: str | None = None, logx: bool = False, logy: bool = False,
           device: torch.device | str | None = None, results_dir: str | Path | None = None) -> Path:
    """Print `rows` as a table, append them to `<results_dir>/<name>.csv`, plot them to `<name>.png`.

    Every row gets the columns of `environment_stamp(device)` (device, torch, triton, date). The plot
    shows this call's rows only (the CSV accumulates runs from different machines): `x` against `y`,
    one line per distinct value of `group`. `results_dir` defaults to `bench/results/` (or
    `$DINOVMF_BENCH_RESULTS`). Returns the CSV path.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    if not rows:
        raise ValueError("rows must be a non-empty list of dicts")
    for col, label in ((x, "x"), (y, "y")) + (((group, "group"),) if group else ()):
        missing = [i for i, r in enumerate(rows) if col not in r]
        if missing:
            raise ValueError(f"{label}={col!r} is missing from rows {missing[:5]}")
    clash = sorted({c for r in rows for c in r if c in STAMP_COLUMNS})
    if clash:
        raise ValueError(f"rows must not define the stamp columns {clash}; record adds them")

    stamp = environment_stamp(device)
    stamped = [{**r, **stamp} for r in rows]
    out_dir = Path(results_dir or os.environ.get("DINOVMF_BENCH_RESULTS") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)

    columns = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    print(f"\n== {title or name} on {stamp['device']} (torch {stamp['torch']}) ==")
    print(format_table(rows, columns))

    csv_path = out_dir / f"{name}.csv"
    _append_csv(csv_path, stamped)
    _plot(out_dir / f"{name}.png", rows, x, y, group,
          f"{title or name}\n{stamp['device']}, torch {stamp['torch']}", logx, logy)
    print(f"-> {csv_path} and {csv_path.with_suffix('.png')}")
    return csv_path
