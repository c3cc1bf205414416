"""The CUDA sources compile with nvcc for sm_90 and sm_80 against the installed torch (no GPU needed)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: cannot compile-check csrc/*.cu")
def test_cuda_sources_compile():
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert sources, "no csrc/*.cu sources"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_compile_check.py")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for src in sources:
        assert f"ok   csrc/{src.name}" in proc.stdout


def test_compile_check_reports_errors(tmp_path):
    """The checker must fail on a broken source (so a passing check means something)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void k(float* x) { x[0] = undefined_symbol; }\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_compile_check.py"), str(bad), "--arch", "90"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "undefined_symbol" in proc.stderr
