"""The static kernel report (tools/kernel_model.py) and its parts: ptxas-log parsing, the occupancy rules,
loops and fences in SASS (tools/kernel_static.py), and the interpreter byte counter (tools/triton_bytes.py)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import kernel_model as km
from tools import kernel_static as ks
from tools.triton_cases import WORKLOADS

ROOT = Path(__file__).resolve().parents[1]

PTXAS_LOG = """ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function '_teacher_probs_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _teacher_probs_kernel
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
    assert km.extrapolate({3: 24, 4: 31, 5: 38}, 64) == 3 + 7 * 64
    assert km.fit_affine({3: 24, 4: 31, 5: 38})[2] == 0.0
    assert 0 < km.fit_affine({3: 24, 4: 32, 5: 38})[2] < km.FIT_TOLERANCE  # tile padding: tolerated, reported
    with pytest.raises(ValueError, match="not affine"):
        km.extrapolate({3: 10, 4: 31, 5: 38}, 64)


def _workload(name: str):
    return next(w for w in WORKLOADS if w.name == name)


def test_byte_counter_counts_what_the_cross_entropy_kernels_touch():
    """The per-logits CE (Triton backend) at S=3, T=2, B=2, K=300 in bf16, planned for a GPU, every count
    known in closed form. Pass 1 (one 384-column range) reads the logits once, the row index once per row,
    and each image's 2 teacher rows once; it writes 5 partials per row. The gradient pass (256-column
    blocks: 2) reads the same plus LSE and psum, the three per-row scalars once per block, and writes the
    bf16 gradient."""
    from dinovmf.kernels import tiling
    from tools.triton_bytes import count_workload

    S, T, B, K = 3, 2, 2, 300
    partials, finish, grad = count_workload(_workload("dino_cross_entropy fwd+bwd").run, S, T, B, K, torch.bfloat16)
    assert (partials.kernel, finish.kernel, grad.kernel) == \
        ("ce_rows._ce_partials_kernel", "ce_rows._ce_finish_kernel", "ce_rows._ce_grad_kernel")
    rows, logits, teacher_row = S * B, S * B * K * 2, K * 4
    index = rows * 8  # int64 row indices
    # One tile holds all 6 rows, visited image by image: the 2 rows of an image paired with teacher view t
    # name the same teacher row in that load, one request; so every teacher row is read once.
    assert partials.loaded == partials.loaded_unique == logits + index + T * B * teacher_row
    assert partials.stored == partials.stored_unique == 5 * rows * 4 and partials.atomic == 0
    assert finish.stored == finish.stored_unique == 4 * rows * 4  # loss_row, lse, psum, sum softmax*l
    blocks = -(-K // tiling.STREAM_BLOCK)
    assert grad.loaded == logits + blocks * (index + 2 * rows * 4) + T * B * teacher_row
    assert grad.loaded_unique == logits + index + T * B * teacher_row + 2 * rows * 4
    assert grad.stored == grad.stored_unique == logits
    assert partials.arg_types["L"] == "*bf16" and partials.ints["n_rows"] == rows
    assert partials.ints["visit_inner"] == S  # the per-logits API walks the view-major rows image by image


def test_image_major_visiting_reads_each_teacher_row_once_per_tile():
    """What the per-logits API's visit_inner = S buys, in the byte model: S=4, T=2, B=4 view-major rows in
    tiles of 8. Walked image by image, a tile holds 2 images' 4 views and reads their 2 x 2 teacher rows;
    walked view by view, it holds 2 views of 4 images and reads 4 x 2: twice the teacher bytes."""
    from dinovmf.kernels.ce_rows import ce_rows
    from _kernel_checks import cross_entropy_inputs
    from tools.triton_bytes import count_launches, gpu_geometry

    S, T, B, K = 4, 2, 4, 256
    logits, probs = cross_entropy_inputs(S, T, B, K, torch.float32)
    x, P, rows = logits.view(S * B, K), probs.view(T * B, K), torch.arange(S * B)
    loaded = {}
    for visit in (1, S):
        with gpu_geometry(132), count_launches() as launches:
            ce_rows(x, None, None, P, rows, B, T, False, None, 1.0, None, None, visit_inner=visit)
        loaded[visit] = launches[0].loaded - S * B * K * 4 - S * B * 8  # the teacher's share (logits, index out)
    assert loaded[S] == T * B * K * 4 and loaded[1] == 2 * loaded[S]


def test_byte_counter_counts_atomics_and_their_semantics():
    """No kernel of the package uses atomics (column sums stay in registers), so a tiny one checks the
    counter: 2 programs add 8 floats each into the same 8 addresses (every lane of an atomic counts)."""
    import triton
    import triton.language as tl

    from tools.triton_bytes import count_launches

    @triton.jit
    def _atomic_kernel(X, N: tl.constexpr):
        tl.atomic_add(X + tl.arange(0, N), tl.full([N], 1.0, tl.float32), sem="relaxed")

    x = torch.zeros(8)
    with count_launches() as launches:
        _atomic_kernel[(2,)](x, N=8)
    (launch,) = launches
    assert torch.equal(x, torch.full((8,), 2.0))
    assert launch.atomic == 2 * 8 * 4 and launch.atomic_unique == 8 * 4 and launch.atomic_sems == ["relaxed"]


def test_no_workload_uses_atomics():
    from tools.triton_bytes import count_workload

    for w in WORKLOADS:
        if not w.name.startswith("augment"):  # the augmentation: its own tests, too slow for this sweep
            assert all(x.atomic == 0 for x in count_workload(w.run, 2, 1, 1, 64, getattr(torch, w.dtypes[0]))), w.name


def test_kernel_model_writes_the_report(tmp_path):
    """End to end at K = 4096 on two workloads: one CSV row per launch configuration and autotune config
    with every column, the exact byte counts of the column-bias kernel (read K norms, write K biases), and
    the GPU's grid for the teacher's pass 1 at T*B = 128 rows on 132 SMs."""
    from dinovmf.kernels import tiling

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "tools.kernel_model", "--K", "4096", "--dtypes", "float32",
                           "--workloads", "teacher_rows none", "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "kernel_model.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "kernel_model.png").stat().st_size > 0
    assert {r["kernel"] for r in rows} == {"teacher._teacher_partials_kernel", "teacher._teacher_finish_kernel",
                                          "teacher._teacher_probs_kernel"}
    assert sum(r["kernel"] == "teacher._teacher_partials_kernel" for r in rows) == len(tiling.TUNE_CONFIGS)
    assert set(km.COLUMNS) <= set(rows[0])
    stats = tiling.column_plan(128, 4096, "cpu", 4, sm_count=132).stats
    assert next(r for r in rows if r["kernel"] == "teacher._teacher_partials_kernel")["grid"] == \
        f"{stats.n_col_blocks}x{stats.groups}"
    for r in rows:
        assert int(r["registers"]) > 0 and int(r["ctas_per_sm"]) >= 1
        assert int(r["bytes_moved"]) >= int(r["bytes_min"]) > 0
        assert r["target"].startswith("sm_90") and r["B"] == "64"
        assert "no GPU run and no timing" in r["basis"]
