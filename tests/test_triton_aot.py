"""Ahead-of-time compile of the Triton kernels for sm_90 and sm_80 (tools/triton_aot.py), and the registry
(tools/triton_cases.py) that says how the host launches them. `make cuda-check` compiles every case; here
the representative subset, in a subprocess (TRITON_INTERPRET must be 0 before triton is imported, and this
process runs the interpreter)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import triton_aot as aot
from tools.triton_cases import DEVICE_FUNCTIONS, WORKLOADS, cases

ROOT = Path(__file__).resolve().parents[1]


def _run(code_or_args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_representative_subset_compiles_for_sm90_and_sm80():
    proc = _run(["-m", "tools.triton_aot", "--quick", "--arch", "90", "--arch", "80"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed, 0 coverage problem(s)" in proc.stdout
    for kernel in {c.kernel for c in cases()}:  # every launched kernel, on both targets
        for arch in (90, 80):
            assert f"OK   sm_{arch} {kernel} " in proc.stdout, f"{kernel} not compiled for sm_{arch}"


def test_ci_subset_covers_every_kernel_and_dtype():
    all_cases = cases()
    ci = [c for c in all_cases if c.ci]
    assert {c.kernel for c in ci} == {c.kernel for c in all_cases}
    data_types = {t for c in ci for t in c.signature.values() if t.startswith("*")}
    assert {"*fp32", "*bf16", "*fp16"} <= data_types


def test_every_jit_function_is_cased_or_a_device_function():
    """In-process (interpreter objects are discovered as well): the registry matches the package."""
    kernels = aot.discover(aot.kernel_modules())
    assert kernels, "no @triton.jit function found in dinovmf.kernels"
    problems = aot.coverage_problems({n: k.source for n, k in kernels.items()}, {c.kernel for c in cases()},
                                     DEVICE_FUNCTIONS, aot.host_launches(kernels, aot.package_roots()))
    assert problems == []


def test_coverage_check_names_each_kind_of_problem():
    sources = {
        "m.launched": "def launched(X):\n    helper(X)\n",
        "m.helper": "def helper(X):\n    pass\n",
        "m.uncased": "def uncased(X):\n    pass\n",
        "m.dead_helper": "def dead_helper(X):\n    pass\n",
        "m.misfiled": "def misfiled(X):\n    pass\n",
    }
    launches = {"m.launched": ["host.py:3"], "m.uncased": ["host.py:9"], "m.misfiled": ["host.py:12"]}
    problems = aot.coverage_problems(sources, {"m.launched", "m.gone"},
                                     {"m.helper", "m.dead_helper", "m.misfiled"}, launches)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "m.uncased (launched at host.py:9) has no compile case" in text
    assert "m.misfiled is listed in DEVICE_FUNCTIONS but host code launches it at host.py:12" in text
    assert "m.dead_helper is listed in DEVICE_FUNCTIONS but no kernel calls it" in text
    assert "names m.gone, which is not a @triton.jit function" in text


def test_check_fails_on_a_kernel_without_case_and_on_a_compile_error():
    """The real CLI with a registry missing one kernel's cases and holding one case that cannot compile
    (a non-power-of-2 block): exit status 1, both named."""
    code = """
import sys
import tools.triton_cases as reg
from tools import triton_aot
full = reg.cases
def patched():
    keep = [c for c in full() if c.kernel != "dino_ce._ce_bwd_kernel" and c.ci]
    bad = [c for c in keep if c.kernel == "vmf_bias._column_bias_kernel"][0]
    import dataclasses
    return keep + [dataclasses.replace(bad, constexprs={"BLOCK_K": 1000})]
reg.cases = patched
sys.exit(triton_aot.main(["--quick", "--arch", "90"]))
"""
    proc = _run(["-c", code])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "COVERAGE dino_ce._ce_bwd_kernel (launched at dino_ce.py:" in proc.stdout
    assert "FAIL sm_90 vmf_bias._column_bias_kernel" in proc.stdout


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_every_host_launch_has_a_registry_case(workload):
    """Run each host workload under the interpreter at K = 4096 (the issue's block size, one tile) and match
    every launch it makes against the registry: the cases are what the host really launches."""
    from tools.triton_bytes import count_workload

    kernels = aot.discover(aot.kernel_modules())
    for dtype in workload.dtypes:
        launches = count_workload(workload.run, 12, 2, 1, 4096, getattr(torch, dtype))
        assert launches, f"{workload.name} launched nothing"
        for launch in launches:
            record = vars(launch)
            autotuned = kernels[launch.kernel].autotuner is not None
            assert aot.find_case(cases(), record, autotuned) is not None, f"no case for {record}"
