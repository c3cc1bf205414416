"""`make gpu-check` (tools/gpu_check.py): the dry run on CPU end to end, and the driver's handling of steps
that hang, fail, or need what the machine lacks."""
import csv
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tools import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def _steps_csv(out: Path) -> dict[str, dict]:
    with open(out / "steps.csv", newline="") as f:
        return {r["step"]: r for r in csv.DictReader(f)}


def test_dry_run_goes_through_every_step_and_exports(tmp_path):
    out, export = tmp_path / "out", tmp_path / "export"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_OUT": str(out), "OUT": str(export),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = _steps_csv(out)
    assert list(steps) == [s.name for s in gc.steps(dry=True)]
    for name, row in steps.items():
        slot = any(n.startswith("module:") for s in gc.steps(True) if s.name == name for n in s.needs)
        assert row["status"] == "ok" or (slot and row["status"] == "skipped" and "not in this checkout" in row["note"]), row
    # Every slot ran its real entry point (no slot is left waiting for a module): each benchmark recorded
    # through bench.harness into the one folder, and the summary names the device.
    assert all(row["status"] == "ok" for row in steps.values()), steps
    for name in ("loss_ce.csv", "loss_ce.png", "loss_teacher.csv", "train_throughput.csv", "device.json",
                 "head_loss.csv", "head_loss.png", "augment_gpu.csv"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "head_loss.csv", newline="") as f:  # the slot's GPU options, dry: Triton (interpreted), bf16
        assert {(r["backend"], r["dtype"], r["config"]) for r in csv.DictReader(f)} == {("triton", "bfloat16", "tiny")}
    aot_log = (out / "logs" / "aot_device_triton.log").read_text()
    assert "0 failed, 0 coverage problem(s)" in aot_log and "regs=" in aot_log  # the current registry, --stats
    with open(out / "train_throughput.csv", newline="") as f:
        assert {r["compile"] for r in csv.DictReader(f)} == {"False", "True"}
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| bench_train_compile | ok |" in summary and "images/s (goal 900)" in summary
    assert "head-to-loss tiny dino_vmf bfloat16 fused" in summary and "augmentation batch 1 cpp" in summary
    assert "summary.md" in proc.stdout or "| step | status |" in proc.stdout  # printed too
    # $OUT gets three files: the summary, the log and an archive of the folder.
    (archive,) = export.glob("gpu_check_*.tar.gz")
    assert (export / "summary.md").read_text() == summary and (export / "gpu_check.log").exists()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert f"{out.name}/summary.md" in names and f"{out.name}/logs/bench_loss_fp32.log" in names


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, not yet reaped by its new parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _table(tmp_path):
    marker = tmp_path / "grandchild.pid"
    hang = ("-c", "import os, subprocess, sys, time; "
                  "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
                  f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    return marker, [
        # 15 s: time for the step to start its child and write the marker even on a loaded machine.
        gc.Step("hangs", "sleeps past its timeout", hang, timeout_s=15),
        gc.Step("fails", "exits 3", ("-c", "import sys; print('boom'); sys.exit(3)"), timeout_s=30),
        gc.Step("slot", "module not here", ("-m", "bench.no_such_benchmark"), 30, needs=("module:bench.no_such_benchmark",)),
        gc.Step("gpu_only", "needs CUDA", ("-c", "pass"), 30, needs=("cuda",)),
        gc.Step("works", "writes {out}/ok", ("-c", "import sys; open(sys.argv[1], 'w').write('1')", "{out}/ok"), 30),
    ]


def test_driver_kills_hung_steps_keeps_going_and_reports(tmp_path, monkeypatch):
    marker, table = _table(tmp_path)
    monkeypatch.setattr(gc, "steps", lambda dry: table)
    for var in ("GPU_CHECK_DRY", "GPU_CHECK_STEPS", "OUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path / "out"))
    t0 = time.perf_counter()
    assert gc.main([]) == 1
    assert time.perf_counter() - t0 < 200  # the 300 s sleeps were killed, not waited for
    steps = _steps_csv(tmp_path / "out")
    assert {k: v["status"] for k, v in steps.items()} == {
        "hangs": "timeout", "fails": "failed", "slot": "skipped", "gpu_only": "skipped", "works": "ok"}
    assert "exit 3" in steps["fails"]["note"] and "boom" in steps["fails"]["note"]
    assert "bench.no_such_benchmark is not in this checkout" in steps["slot"]["note"]
    assert steps["gpu_only"]["note"] == "no CUDA device"
    assert (tmp_path / "out" / "ok").read_text() == "1"
    grandchild = int(marker.read_text())
    for _ in range(50):  # the whole process group went, not only the step's process
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild), "the hung step's child process survived the timeout"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| hangs | timeout |" in summary and "| works | ok |" in summary


def test_budget_skips_steps_that_cannot_start(tmp_path, monkeypatch):
    _, table = _table(tmp_path)
    monkeypatch.setattr(gc, "steps", lambda dry: table[-1:])
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", "5")  # below the minimum a step is started with
    monkeypatch.delenv("OUT", raising=False)
    assert gc.main([]) == 0
    assert "out of the 5 s budget" in _steps_csv(tmp_path / "out")["works"]["note"]


def test_unknown_step_filter_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("GPU_CHECK_STEPS", "bench_trian")
    assert gc.main([]) == 2
    assert "unknown steps in GPU_CHECK_STEPS: ['bench_trian']" in capsys.readouterr().out
