"""The static kernel report (bench/kernel_model.py) and its parts: ptxas-log parsing, the occupancy rules,
loops and fences in SASS (tools/kernel_static.py), and the interpreter byte counter (tools/triton_bytes.py)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import kernel_model as km
from tools import kernel_static as ks
from tools.triton_cases import WORKLOADS

ROOT = Path(__file__).resolve().parents[1]

PTXAS_LOG = """ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function '_teacher_row_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _teacher_row_kernel
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas-blackwell info    : Used 82 registers, used 1 barriers
"""


def test_ptxas_log_is_parsed():
    s = ks.parse_ptxas_log(PTXAS_LOG)
    assert (s.registers, s.spill_stores, s.spill_loads, s.stack_frame, s.spills) == (82, 12, 16, 8, 28)
    with pytest.raises(ValueError, match="not a ptxas -v log"):
        ks.parse_ptxas_log("ptxas info: nothing here")


@pytest.mark.parametrize("regs,warps,smem,expected", [
    (64, 8, 0, (4, "registers")),  # 2048 regs/warp: 8 warps per quarter -> 32 warps -> 4 CTAs of 8 (= threads)
    (167, 8, 0, (1, "registers")),  # 168 x 32 = 5376 regs/warp: 3 warps per quarter -> 12 warps -> 1 CTA
    (128, 8, 0, (2, "registers")),
    (82, 8, 8192, (2, "registers")),  # 88 x 32: 5 warps per quarter -> 20 warps -> 2 CTAs
    (56, 4, 0, (9, "registers")),  # 56 x 32: 9 warps per quarter -> 36 warps -> 9 CTAs of 4
    (32, 1, 0, (32, "ctas")),  # 64 one-warp CTAs fit the registers and threads; the 32-CTA cap binds
    (32, 4, 100 * 1024, (2, "shared memory")),  # (100 KiB + 1 KiB reserved) x 2 <= 228 KiB
    (24, 16, 0, (4, "threads")),  # 512 threads: 2048 / 512 (the registers would allow 5)
    (256, 4, 0, (0, "cannot launch")),  # above the 255-register limit
])
def test_ctas_per_sm_follow_the_sm90_occupancy_rules(regs, warps, smem, expected):
    assert ks.ctas_per_sm(regs, warps, smem, ks.SM90) == expected


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA 0x100 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   MEMBAR.ALL.GPU ;
        /*0040*/                   ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, desc[UR4][R6.64], R8 ;
        /*0050*/                   CCTL.IVALL ;
        /*0060*/              @!P1 BRA 0x20 ;
        /*0070*/                   MEMBAR.SC.GPU ;
        /*0080*/                   LDG.E R9, desc[UR4][R2.64] ;
        /*0090*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R6.64], R8 ;
        /*00a0*/               @P2 BRA 0x80 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_sass_loops_find_fences_between_branch_target_and_backward_branch():
    loops = ks.sass_loops(SASS)
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x60), (0x80, 0xa0)]  # not the forward / self branch
    assert loops[0].fences == ["0x0030 MEMBAR.ALL.GPU", "0x0050 CCTL.IVALL"] and loops[0].global_loads == 1
    assert loops[1].fences == [] and loops[1].global_loads == 1  # the relaxed REDG loop: no fence
    summary = ks.fences_in_loops(SASS)
    assert summary.count == 2 and summary.kinds == ("CCTL.IVALL", "MEMBAR.ALL.GPU") and summary.streaming
    assert not ks.fences_in_loops("        /*0000*/                   EXIT ;\n").streaming


def test_extrapolation_is_exact_for_affine_counts_and_rejects_others():
    assert km.extrapolate({1: 10, 2: 17, 3: 24}, 64, check_batch=3) == 10 + 7 * 63
    with pytest.raises(ValueError, match="not affine"):
        km.extrapolate({1: 10, 2: 17, 3: 25}, 64, check_batch=3)


def test_byte_counter_counts_what_the_cross_entropy_kernels_touch():
    """S=3, T=2, B=2, K=300: every count known in closed form. Forward: the logits once, and per student
    row the teacher rows it is paired with (4 row reads per image, from 2 distinct rows); 3 floats out per
    row. Backward: the same reads plus LSE, teacher mass and the upstream gradient per row; the gradient out."""
    from tools.triton_bytes import count_workload

    S, T, B, K = 3, 2, 2, 300
    fwd, bwd = count_workload(WORKLOADS[0].run, S, T, B, K, torch.bfloat16)
    assert (fwd.kernel, bwd.kernel) == ("dino_ce._ce_fwd_kernel", "dino_ce._ce_bwd_kernel")
    pairs_rows, logits, teacher_row = 4 * B, S * B * K * 2, K * 4
    assert (fwd.loaded, fwd.loaded_unique) == (logits + pairs_rows * teacher_row, logits + T * B * teacher_row)
    assert fwd.stored == fwd.stored_unique == 3 * S * B * 4 and fwd.atomic == 0
    per_row_scalars = 3 * S * B * 4  # LSE, teacher mass, and G (one float, read by every program)
    assert bwd.loaded == logits + pairs_rows * teacher_row + per_row_scalars
    assert bwd.loaded_unique == logits + T * B * teacher_row + 2 * S * B * 4 + 4
    assert bwd.stored == bwd.stored_unique == logits
    assert fwd.num_warps == 8 and fwd.grid == [S * B] and fwd.arg_types["L"] == "*bf16"


def test_byte_counter_counts_atomics_and_their_semantics():
    from tools.triton_bytes import count_workload

    teacher_logit = next(w for w in WORKLOADS if w.name.startswith("teacher logit"))
    (launch,) = count_workload(teacher_logit.run, 12, 2, 1, 300, torch.float32)
    assert launch.atomic == 2 * 300 * 4 and launch.atomic_unique == 300 * 4  # 2 rows into one [K] stat
    assert launch.atomic_sems  # the semantics the kernel asked for are recorded


def test_kernel_model_writes_the_report(tmp_path):
    """End to end at K = 4096 on two workloads: one CSV row per launch configuration with every column,
    and the exact byte counts of the column-bias kernel (read K norms, write K biases)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_model", "--K", "4096", "--dtypes", "float32",
                           "--workloads", "vmf column bias", "teacher none (vMF)", "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "kernel_model.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "kernel_model.png").stat().st_size > 0
    assert {r["kernel"] for r in rows} == {"vmf_bias._column_bias_kernel", "teacher._teacher_row_kernel"}
    assert set(km.COLUMNS) <= set(rows[0])
    bias = next(r for r in rows if r["kernel"] == "vmf_bias._column_bias_kernel")
    assert int(bias["bytes_moved"]) == int(bias["bytes_min"]) == 2 * 4096 * 4
    assert bias["streaming"] == "False" and bias["misses"] == "none"
    for r in rows:
        assert int(r["registers"]) > 0 and int(r["ctas_per_sm"]) >= 1
        assert int(r["bytes_moved"]) >= int(r["bytes_min"]) > 0
        assert r["target"].startswith("sm_90") and r["B"] == "64"
