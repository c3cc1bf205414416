"""Ahead-of-time compile of the Triton kernels for sm_90 and sm_80 (tools/triton_aot.py), and the one registry
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
from tools.triton_cases import CAN_BE_ONE, DEVICE_FUNCTIONS, WORKLOADS, cases

ROOT = Path(__file__).resolve().parents[1]


def _run(code_or_args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_representative_subset_compiles_for_sm90_and_sm80():
    proc = _run(["-m", "tools.triton_aot", "--quick", "--arch", "90", "--arch", "80"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed, 0 coverage problem(s)" in proc.stdout
    for kernel in {c.kernel for c in cases()}:  # every launched kernel, on both targets, and with its ones
        for arch in (90, 80):
            assert f"OK   sm_{arch} {kernel} " in proc.stdout, f"{kernel} not compiled for sm_{arch}"
            assert any(line.startswith(f"OK   sm_{arch} {kernel} ") and (" K=1 " in line or " H=1 " in line
                                                                         or " n_rows=1 " in line)
                       for line in proc.stdout.splitlines()), f"{kernel}: its ones case not compiled for sm_{arch}"


def test_ci_subset_covers_every_kernel_dtype_and_specialisation():
    all_cases = cases()
    ci = [c for c in all_cases if c.ci]
    assert {c.kernel for c in ci} == {c.kernel for c in all_cases}
    data_types = {t for c in ci for t in c.signature.values() if t.startswith("*")}
    assert {"*fp32", "*bf16", "*u8"} <= data_types
    assert "*fp16" in {t for c in all_cases for t in c.signature.values()}  # fp16 in the full check
    # every kernel has a case with all its can-be-one integers as constants, and only integers are
    for kernel in {c.kernel for c in all_cases}:
        base = next(c for c in all_cases if c.kernel == kernel)
        can_be_one = {n for n in CAN_BE_ONE if base.signature.get(n) == "i32"}
        assert can_be_one and any(c.kernel == kernel and can_be_one <= set(c.specialized) for c in ci), \
            f"{kernel} has no CI case with {sorted(can_be_one)} = 1"
    for c in all_cases:
        assert all(n not in c.signature for n in c.specialized), c.label


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
    """The real CLI with a registry missing one kernel's cases, holding one case that cannot compile (a
    non-power-of-2 block) and one whose `tuned` flag is wrong: exit status 1, each named."""
    code = """
import dataclasses, sys
import tools.triton_cases as reg
from tools import triton_aot
full = reg.cases
def patched():
    keep = [c for c in full() if c.kernel != "ce_rows._ce_grad_kernel" and c.ci and not c.specialized]
    bad = [c for c in keep if c.kernel == "augment._blur_kernel"][0]
    untuned = [c for c in keep if c.kernel == "ce_rows._ce_partials_kernel"][0]
    return keep + [dataclasses.replace(bad, constexprs={**bad.constexprs, "BLOCK": 1000}), dataclasses.replace(untuned, tuned=False)]
reg.cases = patched
sys.exit(triton_aot.main(["--quick", "--arch", "90", "--only", "ce_rows."]))
"""
    proc = _run(["-c", code])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "COVERAGE ce_rows._ce_grad_kernel (launched at ce_rows.py:" in proc.stdout
    assert "says tuned=False, but ce_rows._ce_partials_kernel is autotuned" in proc.stdout
    assert "augment._blur" not in proc.stdout.split("COVERAGE")[0]  # --only: the blur case was not compiled
    proc = _run(["-c", code.replace('"--only", "ce_rows."', '"--only", "augment._blur"')])
    assert proc.returncode == 1 and "FAIL sm_90 augment._blur_kernel" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_every_host_launch_has_a_registry_case(workload):
    """Run each host workload under the interpreter at K = 4096 (one interpreter tile) and match every launch
    it makes against the registry: the cases are what the host really launches. (The augmentation's crop
    sizes are DINO's, whatever K: its workload runs one image.)"""
    from tools.triton_bytes import count_workload

    for dtype in workload.dtypes:
        launches = count_workload(workload.run, 12, 2, 1, 4096, getattr(torch, dtype))
        assert launches, f"{workload.name} launched nothing"
        for launch in launches:
            assert aot.find_case(cases(), vars(launch)) is not None, f"no case for {vars(launch)}"


def test_workloads_launch_every_kernel_family():
    """Together the workloads launch every kernel that has cases (what the kernel model reports on)."""
    from tools.triton_bytes import count_workload

    launched = set()
    for w in WORKLOADS:
        if w.name.startswith("augment"):
            launched |= {"augment._stage_kernel", "augment._photometric_kernel", "augment._blur_kernel"}
            continue  # its launches are checked above; here the cheap ones
        launched |= {x.kernel for x in count_workload(w.run, 2, 1, 1, 64, getattr(torch, w.dtypes[0]))}
    assert launched == {c.kernel for c in cases()}
