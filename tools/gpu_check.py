"""`make gpu-check`: the first minutes on a GPU as one command (issue #16 §4, §5).

    python3 -m tools.gpu_check                       # on one H100 / H200: about 8 minutes, no network
    GPU_CHECK_DRY=1 python -m tools.gpu_check        # every step on CPU at tiny sizes (tests/test_gpu_check.py)
    GPU_CHECK_STEPS=gpu_tests,bench_train_eager python3 -m tools.gpu_check   # a subset (setup, device always run)

The steps are the table `steps()`: set the package up (editable install, no network), record the device,
run the GPU tests (Triton kernels on CUDA against float64, the GPU smoke tests of a real training step),
the loss-kernel benchmarks (ours vs eager vs torch.compile, % of measured copy bandwidth), the fused
head-to-loss benchmark (bf16, Triton, vs its GEMM floor), the ViT-B/16 multi-crop training step (bf16, fused
AdamW, eager and torch.compile; images/s and MFU against the 900 images/s goal), the registry's AOT compile
with the machine's own triton and the GPU augmentation benchmark. A step whose module is not in this
checkout, or that needs hardware the machine lacks, is skipped with the reason. Each step runs
in its own process group with its own timeout (killed, never waited on forever), inside an overall budget
(GPU_CHECK_BUDGET_S, default 480 s); a failed step does not stop the next. Exit status: 1 if a step
failed or timed out, else 0.

Everything goes to one folder: GPU_CHECK_OUT if set, else bench/results/gpu_check/<UTC date>-<mode>:
every benchmark's CSV + PNG (through bench.harness, stamped with device and date), one log per step,
steps.csv, device.json, gpu_tests.xml and summary.md (device, date, versions, each step's status and the
headline numbers), which is also printed. When $OUT is set (the device tool's output folder, which
returns at most 8 files), $OUT receives summary.md, gpu_check.log and gpu_check_<date>.tar.gz of the folder.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # issue #16 §4: at most 8 minutes on the GPU machine
MIN_STEP_S = 20  # a step is not started with less than this left in the budget
IMAGES_PER_S_GOAL = 900  # ViT-B/16 multi-crop, one H100 (bench/bench_train.py)
# The GPU tests: Triton kernels on CUDA against float64 oracles, and the smoke tests of GPU-only paths.
# Add a file here when a new kernel gets tests; files missing from the checkout are left out (and said so).
GPU_TEST_FILES = ("tests/test_kernels_triton.py", "tests/test_gpu_smoke.py")


@dataclass(frozen=True)
class Step:
    """One command of the check: `python <argv>` from the repository root, `{out}` replaced by the folder."""
    name: str
    what: str  # one line for the summary
    argv: tuple[str, ...]
    timeout_s: int
    needs: tuple[str, ...] = ()  # "cuda" (waived in dry mode), "module:<dotted name>"
    env: dict = field(default_factory=dict)


def steps(dry: bool) -> list[Step]:
    """The check, in order of value per GPU minute. `dry`: tiny sizes on CPU, same code paths."""
    tests = [f for f in GPU_TEST_FILES if (ROOT / f).exists()]
    missing = [f for f in GPU_TEST_FILES if f not in tests]
    loss_tiny = ("--S", "4", "--T", "2", "--B", "2", "--iters", "1", "--warmup", "0", "--no-compile", "--device", "cpu")
    train_tiny = ("--arch", "vit_tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--global-size", "32",
                  "--local-size", "16", "--n-local", "2", "--out-dim", "256")
    return [
        Step("setup", "install this checkout (editable, no network; C++ op, no CUDA twin: retired)",
             ("-m", "tools.gpu_check", "--setup"), 240),
        Step("device", "device, driver and library versions -> device.json",
             ("-m", "tools.gpu_check", "--device-info", "{out}/device.json"), 60),
        Step("gpu_tests", f"pytest {' '.join(tests)} (Triton on CUDA vs float64; smoke tests)"
                          + (f"; not in this checkout: {' '.join(missing)}" if missing else ""),
             # Dry: collect only (the files import, the tests are found); on CPU they skip anyway.
             ("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml={out}/gpu_tests.xml",
              *(("--collect-only",) if dry else ()), *tests), 200, needs=("cuda",)),
        Step("bench_loss_fp32", "fused CE + teacher vs eager vs torch.compile, fp32, % of copy bandwidth",
             ("-m", "bench.bench_loss", "--k", "256", *loss_tiny) if dry else
             ("-m", "bench.bench_loss", "--k", "4096", "65536", "--dtype", "float32"), 150, needs=("cuda",)),
        # The fused head-to-loss op (issue #14) at the issue size in bf16 on the Triton kernels. Dry: the same
        # code path (Triton backend, bf16, synchronised timing helpers) at the tiny size, under the interpreter.
        Step("bench_head_loss", "fused head-to-loss op (Triton, bf16) vs eager vs torch.compile vs GEMM floor",
             ("-m", "bench.bench_head_loss", "--configs", "tiny", "--iters", "1", "--warmup", "0", "--no-compile",
              "--device", "cpu", "--backend", "triton", "--dtype", "bfloat16") if dry else
             ("-m", "bench.bench_head_loss", "--configs", "issue", "--device", "cuda", "--dtype", "bfloat16",
              "--iters", "5", "--warmup", "2"), 150, needs=("cuda",)),
        Step("bench_train_eager", "ViT-B/16 2x224+10x96, batch 64, K=65536, bf16, fused AdamW, eager",
             ("-m", "bench.bench_train", *train_tiny) if dry else
             ("-m", "bench.bench_train", "--steps", "200", "--warmup", "20"), 150, needs=("cuda",)),
        Step("bench_train_compile", "the same training step under torch.compile",
             ("-m", "bench.bench_train", *train_tiny, "--compile") if dry else
             ("-m", "bench.bench_train", "--steps", "200", "--warmup", "20", "--compile"), 240, needs=("cuda",),
             # Dry: the flag and its code path, without minutes of CPU compilation.
             env={"TORCHDYNAMO_DISABLE": "1"} if dry else {}),
        Step("bench_loss_bf16", "fused CE + teacher, bf16 logits",
             ("-m", "bench.bench_loss", "--k", "256", "--dtype", "bfloat16", *loss_tiny) if dry else
             ("-m", "bench.bench_loss", "--k", "65536", "--dtype", "bfloat16"), 120, needs=("cuda",)),
        # The registry (tools/triton_cases.py) CI subset compiled by the machine's own triton (the image's
        # version, not the pinned one): registers / spills of the toolchain that really runs, to set beside
        # kernel_model.csv. Dry: the launch-registry coverage check and one family, not minutes of ptxas.
        Step("aot_device_triton", "AOT compile of the registry's CI subset with this machine's triton, ptxas -v",
             ("-m", "tools.triton_aot", "--quick", "--arch", "90", "--stats",
              *(("--only", "augment._blur") if dry else ())), 90),
        # The GPU augmentation (bench/bench_augment.py's GPU rows). Dry: the same code with the C++ op on CPU.
        Step("bench_augment_gpu", "GPU augmentation (Triton) vs eager, batch 64, 2x224+10x96, vs the copy floor",
             ("-m", "bench.bench_augment", "--gpu-only", "--device", "cpu", "--gpu-batch", "1", "--gpu-iters", "1")
             if dry else ("-m", "bench.bench_augment", "--gpu-only", "--gpu-batch", "64"), 90, needs=("cuda",)),
    ]


# ------------------------------------------------------------------------------------------ running
@dataclass
class Result:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    note: str = ""


def unmet_need(step: Step, dry: bool, device: dict) -> str | None:
    """Why `step` cannot run here, or None."""
    for need in step.needs:
        if need == "cuda" and not dry and not device.get("cuda_available"):
            return "no CUDA device"
        if need.startswith("module:"):
            module = need.split(":", 1)[1]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"{module} is not in this checkout (slot kept for it)"
    return None


def run_command(argv: list[str], env: dict, log: Path, timeout_s: float) -> tuple[str, int | None]:
    """Run `argv` in its own process group, output to `log`; ('ok'|'failed'|'timeout', return code)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            f.write(f"\n[gpu_check] killed after {timeout_s:.0f} s\n".encode())
            return "timeout", None
    return ("ok" if rc == 0 else "failed"), rc


def run_step(step: Step, python: str, out: Path, env: dict, timeout_s: float) -> Result:
    argv = [python, *(a.replace("{out}", str(out)) for a in step.argv)]
    log = out / "logs" / f"{step.name}.log"
    t0 = time.perf_counter()
    status, rc = run_command(argv, {**env, **step.env}, log, timeout_s)
    note = "" if status == "ok" else (f"exit {rc}" if status == "failed" else f"timed out after {timeout_s:.0f} s")
    if status != "ok":
        note += f"; see logs/{step.name}.log: " + _tail(log)
    return Result(step.name, status, time.perf_counter() - t0, note)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:200] for line in text[-lines:])


# ------------------------------------------------------------------------------------------ setup
def installed_here() -> bool:
    """Whether this python imports dinovmf.kernels from this checkout (the editable install maps kernels/)."""
    spec = importlib.util.find_spec("dinovmf.kernels")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == ROOT / "kernels"


def setup(dry: bool) -> int:
    """(the `setup` step) Install this checkout editable, from nothing but the tree: no index, no build
    isolation, no dependencies (the image has them). The C++ op is built; the CUDA twin is retired
    (DINOVMF_CUDA=0). If the C++ build fails, install without compiled extensions: no GPU path needs one."""
    if installed_here():
        print(f"dinovmf is already installed from {ROOT}")
        return 0
    if dry:
        print(f"dinovmf is not installed from {ROOT}: run `make install` (the dry run installs nothing)")
        return 1
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
           "-e", str(ROOT)]
    env = {**os.environ, "DINOVMF_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if subprocess.call(cmd, cwd=ROOT, env=env) == 0:
        return 0
    print("[setup] the install with the C++ op failed; installing without compiled extensions", flush=True)
    return subprocess.call(cmd, cwd=ROOT, env={**env, "DINOVMF_NO_EXT": "1"})


# ------------------------------------------------------------------------------------------ reporting
def device_info() -> dict:
    """What the machine is: written by the `device` step (a subprocess, so the driver never holds a GPU)."""
    import platform

    import torch

    from bench.harness import device_name

    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), gpus=torch.cuda.device_count(), device=device_name())
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - any import failure: report it, the tests will say more
        info["triton"] = f"unavailable ({type(e).__name__}: {e})"
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count)
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    return info


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value: str, digits: int = 3) -> str:
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def headlines(out: Path) -> list[str]:
    """The numbers worth reading first, from the CSVs the steps wrote (all from this run: a fresh folder)."""
    lines = []
    xml = out / "gpu_tests.xml"
    if xml.exists():
        try:
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            a = suite.attrib
            lines.append(f"GPU tests: {a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, "
                         f"{a.get('skipped')} skipped")
        except (ET.ParseError, AttributeError):
            lines.append("GPU tests: unreadable gpu_tests.xml")
    for r in _rows(out / "train_throughput.csv"):
        lines.append(f"training step {r.get('arch')} batch {r.get('batch')} {r.get('crops')} K={r.get('K')} "
                     f"compile={r.get('compile')}: {_fmt(r.get('images_per_s'), 4)} images/s "
                     f"(goal {IMAGES_PER_S_GOAL}), MFU {_fmt(r.get('mfu'))}, {_fmt(r.get('step_ms'), 4)} ms/step"
                     + (f", peak {_fmt(r.get('peak_mem_gib'))} GiB" if r.get("peak_mem_gib") else ""))
    for name in ("loss_ce", "loss_teacher"):
        for r in _rows(out / f"{name}.csv"):
            bw = f", {float(r['bw_frac_of_copy']):.0%} of copy bandwidth" if r.get("bw_frac_of_copy") else ""
            lines.append(f"{name} K={r.get('K')} {r.get('dtype')} {r.get('backend')}: {_fmt(r.get('ms'))} ms, "
                         f"{_fmt(r.get('speedup_vs_eager'))}x eager{bw}")
    for r in _rows(out / "head_loss.csv"):
        extra = f", peak extra {_fmt(r.get('peak_extra_x_logits'))}x the logits" if r.get("peak_extra_x_logits") else ""
        lines.append(f"head-to-loss {r.get('config')} {r.get('method')} {r.get('dtype')} {r.get('impl')}: "
                     f"{_fmt(r.get('ms'))} ms, {_fmt(r.get('x_floor'))}x the GEMM floor{extra}")
    for r in _rows(out / "augment_gpu.csv"):
        lines.append(f"augmentation batch {r.get('batch')} {r.get('implementation')}: {_fmt(r.get('ms_per_batch'))} ms "
                     f"({_fmt(r.get('images_per_s'), 4)} images/s), {_fmt(r.get('x_floor'))}x the copy floor")
    for r in _rows(out / "gpu_smoke_memory.csv"):
        lines.append(f"peak memory of a {r.get('arch')} step (batch {r.get('batch')}, K={r.get('K')}): "
                     f"{_fmt(r.get('peak_mem_gib'))} GiB")
    return lines


def write_summary(out: Path, results: list[Result], device: dict, dry: bool, started: str) -> str:
    with open(out / "steps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "status", "seconds", "note"])
        w.writeheader()
        w.writerows(dict(step=r.name, status=r.status, seconds=round(r.seconds, 1), note=r.note) for r in results)
    what = {s.name: s.what for s in steps(dry)}
    md = [f"# gpu-check {'(DRY RUN on CPU, tiny sizes: no GPU figure here)' if dry else ''}".strip(), "",
          f"- date (UTC): {started}",
          f"- device: {device.get('device', '?')}" + (f", {device['gpus']} GPU(s), {device.get('memory_gib')} GiB, "
                                                     f"sm {device.get('capability')}" if device.get("gpus") else ""),
          f"- nvidia-smi: {device.get('nvidia_smi', 'n/a')}",
          f"- python {device.get('python', '?')}, torch {device.get('torch', '?')} (CUDA {device.get('cuda')}), "
          f"triton {device.get('triton', '?')}", "",
          "| step | status | seconds | what | note |", "|---|---|---|---|---|"]
    md += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {what.get(r.name, '')} | {r.note.replace('|', '/')} |"
           for r in results]
    md += ["", "## Headlines", ""] + [f"- {line}" for line in headlines(out) or ["(none recorded)"]]
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    return text


def export_to(dest: Path, out: Path, stamp: str) -> Path:
    """The device tool returns at most 8 files from $OUT: summary.md, the driver's log and one archive."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f"gpu_check_{stamp}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    for name in ("summary.md", "gpu_check.log"):
        if (out / name).exists():
            shutil.copy2(out / name, dest / name)
    return archive


# ------------------------------------------------------------------------------------------ main
class _Tee:
    """Print to the console and to the folder's gpu_check.log."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-info", type=Path, metavar="JSON", help="(the `device` step) write device.json")
    ap.add_argument("--setup", action="store_true", help="(the `setup` step) install this checkout")
    args = ap.parse_args(argv)
    if args.setup:
        return setup(os.environ.get("GPU_CHECK_DRY") == "1")
    if args.device_info:
        args.device_info.write_text(json.dumps(device_info(), indent=1))
        print(args.device_info.read_text())
        return 0

    dry = os.environ.get("GPU_CHECK_DRY") == "1"
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S))
    only = {s for s in os.environ.get("GPU_CHECK_STEPS", "").split(",") if s}
    now = dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S") + ("-dry" if dry else "")
    out = Path(os.environ.get("GPU_CHECK_OUT") or ROOT / "bench" / "results" / "gpu_check" / stamp).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log = _Tee(out / "gpu_check.log")
    python = os.environ.get("GPU_CHECK_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DINOVMF_BENCH_RESULTS": str(out),
           "TRITON_INTERPRET": "1" if dry else "0", "MPLBACKEND": "Agg"}
    table = steps(dry)
    unknown = only - {s.name for s in table}
    if unknown:
        log(f"[gpu_check] unknown steps in GPU_CHECK_STEPS: {sorted(unknown)}; known: {[s.name for s in table]}")
        return 2
    log(f"[gpu_check] {'DRY RUN (CPU, tiny sizes)' if dry else 'GPU check'} -> {out} (budget {budget:.0f} s, "
        f"python {python})")
    t0 = time.perf_counter()
    results: list[Result] = []
    device: dict = {}
    for step in table:
        if only and step.name not in only and step.name not in ("setup", "device"):
            continue
        remaining = budget - (time.perf_counter() - t0)
        why = unmet_need(step, dry, device) if step.name not in ("setup", "device") else None
        if why is None and remaining < MIN_STEP_S:
            why = f"out of the {budget:.0f} s budget"
        if why is not None:
            results.append(Result(step.name, "skipped", 0.0, why))
            log(f"[gpu_check] {step.name}: skipped ({why})")
            continue
        log(f"[gpu_check] {step.name}: {step.what} (timeout {min(step.timeout_s, remaining):.0f} s)")
        r = run_step(step, python, out, env, min(step.timeout_s, remaining))
        results.append(r)
        log(f"[gpu_check] {step.name}: {r.status} in {r.seconds:.0f} s {r.note}".rstrip())
        if step.name == "device" and (out / "device.json").exists():
            device = json.loads((out / "device.json").read_text())
    summary = write_summary(out, results, device, dry, now.isoformat(timespec="seconds"))
    log("\n" + summary)
    bad = [r.name for r in results if r.status in ("failed", "timeout")]
    log(f"[gpu_check] {'FAILED: ' + ', '.join(bad) if bad else 'all steps ok or skipped'} "
        f"({time.perf_counter() - t0:.0f} s); results in {out}")
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out:
        archive = export_to(Path(os.environ["OUT"]), out, stamp)
        print(f"[gpu_check] $OUT: summary.md, gpu_check.log, {archive.name}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
