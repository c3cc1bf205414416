"""The C++ CPU row kernels (dinovmf._C via dinovmf._ext) against float64 oracles: `ce_rows` (every pairing,
dtype, column-scale / bias / row-weight combination, in place or not, one to many K tiles) and
`teacher_rows` (every centering mode), plus the public per-logits API on them. Tolerances: the flash
rule of tests/_kernel_checks.py (the same-dtype torch reference is `ce_rows_reference` /
`teacher_rows_reference` on the same inputs; the oracle is the same reference in float64)."""
import functools
import os
import subprocess
import sys

import pytest
import torch

from dinovmf._ext import ce_rows_cpp, teacher_rows_cpp
from dinovmf.centering import teacher_distribution, teacher_rows_reference
import _kernel_checks as kt
from dinovmf.loss import dino_cross_entropy
from dinovmf.loss_reference import ce_rows_reference

LAYOUTS = [(12, 2), (2, 2), (4, 1)]  # DINO multi-crop, two globals only, one teacher view
LOW = [torch.bfloat16, torch.float16]


def ce_rows_case(S, T, B, K, dtype, same_view=False, scale=True, bias=True, weights=False, seed=0):
    """Raw chunk logits (rows in image-major order, a partial chunk), the [K] vectors and teacher rows."""
    g = torch.Generator().manual_seed(seed)
    n_rows = S * B
    order = torch.arange(n_rows).view(S, B).t().reshape(-1)
    row_index = order[1:-1].contiguous() if n_rows > 3 else order  # not every row, not in view order
    c = row_index.numel()
    logits = (torch.randn(c, K, generator=g, dtype=torch.float64) * 2).to(dtype)
    n_teacher = n_rows if same_view else T * B
    probs = torch.softmax(torch.randn(n_teacher, K, generator=g, dtype=torch.float64) * 3, 1).float()
    col_scale = (torch.rand(K, generator=g) * 2 + 0.5) if scale else None
    col_bias = (torch.randn(K, generator=g) * 0.5) if bias else None
    row_weight = (torch.rand(c, generator=g) + 0.1) if weights else None
    return logits, col_scale, col_bias, probs, row_index, B, T, same_view, row_weight


def run_ce_rows(fn, case, grad: bool, in_place: bool, dtype=None):
    logits, col_scale, col_bias, probs, row_index, B, T, same_view, row_weight = case
    if dtype is not None:  # the oracle: everything in float64
        cast = (lambda x: None if x is None else x.to(dtype))
        logits, col_scale, col_bias, probs, row_weight = map(cast, (logits, col_scale, col_bias, probs, row_weight))
    logits = logits.clone()
    grad_out = (logits if in_place else torch.empty_like(logits)) if grad else None
    col_sum = torch.zeros(logits.shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    stats = fn(logits, col_scale, col_bias, probs, row_index, B, T, same_view, row_weight, 0.37, grad_out,
               col_sum if grad else None)
    return stats, grad_out, col_sum


def check_ce_rows(case, dtype, grad=True, in_place=True):
    stats, g, col = run_ce_rows(ce_rows_cpp, case, grad, in_place)
    stats64, g64, col64 = run_ce_rows(ce_rows_reference, case, grad, in_place, dtype=torch.float64)
    stats_t, g_t, col_t = run_ce_rows(ce_rows_reference, case, grad, in_place)
    assert stats.dtype == torch.float32 and stats.shape == (4, case[0].shape[0])
    for i, name in enumerate(("loss_row", "lse", "psum", "sum_softmax_l")):
        kt.assert_flash_rule(name, stats[i], stats64[i], stats_t[i], torch.float32)
    if grad:
        assert g.dtype == dtype
        kt.assert_flash_rule("grad_out", g, g64, g_t, dtype)
        kt.assert_flash_rule("col_grad_sum", col, col64, col_t, torch.float32)
    else:
        assert col.abs().sum() == 0


@pytest.mark.parametrize("S,T", LAYOUTS)
@pytest.mark.parametrize("K", [333, 4099])  # 333 < one tile; 4099 = two full tiles + a 3-wide tail
def test_ce_rows_dino_pairing_fp32(S, T, K):
    check_ce_rows(ce_rows_case(S, T, 3, K, torch.float32), torch.float32)


@pytest.mark.parametrize("scale,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("in_place", [True, False])
def test_ce_rows_optional_vectors_and_separate_output(scale, bias, in_place):
    check_ce_rows(ce_rows_case(4, 2, 3, 333, torch.float32, scale=scale, bias=bias), torch.float32,
                  in_place=in_place)


@pytest.mark.parametrize("weights", [False, True])
def test_ce_rows_same_view_with_row_weights(weights):
    check_ce_rows(ce_rows_case(1, 1, 9, 4099, torch.float32, same_view=True, weights=weights), torch.float32)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("S,T", LAYOUTS)
def test_ce_rows_low_precision(S, T, dtype):
    check_ce_rows(ce_rows_case(S, T, 2, 4099, dtype), dtype)


def test_ce_rows_without_gradient_writes_nothing():
    case = ce_rows_case(4, 2, 3, 333, torch.float32)
    before = case[0].clone()
    check_ce_rows(case, torch.float32, grad=False)
    assert torch.equal(case[0], before)


def test_ce_rows_issue_width():
    check_ce_rows(ce_rows_case(12, 2, 1, 65536, torch.float32), torch.float32)


def test_ce_rows_is_deterministic():
    case = ce_rows_case(12, 2, 3, 4099, torch.float32)
    first = run_ce_rows(ce_rows_cpp, case, True, True)
    for _ in range(3):
        for a, b in zip(first, run_ce_rows(ce_rows_cpp, case, True, True)):
            assert torch.equal(a, b)


def test_ce_rows_rejects_out_of_range_rows():
    case = list(ce_rows_case(1, 1, 4, 333, torch.float32, same_view=True))
    case[4] = torch.full_like(case[4], 99)
    with pytest.raises(RuntimeError, match="row_index 99 out of range"):
        run_ce_rows(ce_rows_cpp, tuple(case), True, True)


def teacher_case(N, K, dtype, mode, scale=True, bias=True, seed=0):
    dots, center, _ = kt.teacher_inputs(N, K, dtype, mode, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    col_scale = (torch.rand(K, generator=g) + 0.5) if scale else None
    col_bias = (torch.randn(K, generator=g) * 0.5) if bias else None
    return dots, (center if mode in ("logit", "prob") else None), col_scale, col_bias


def check_teacher_rows(case, mode, in_place=False):
    dots, center, col_scale, col_bias = case
    out = dots.clone() if in_place else None
    probs, stat, entropy, argmax = teacher_rows_cpp(out if in_place else dots, kt.TEMP, mode, center, col_scale,
                                                    col_bias, out)
    if in_place:
        assert probs.data_ptr() == out.data_ptr()

    def f64(x):
        return None if x is None else x.double()
    p64, s64, e64, _ = teacher_rows_reference(dots.double(), kt.TEMP, mode, f64(center), f64(col_scale), f64(col_bias))
    p_t, s_t, e_t, _ = teacher_rows_reference(dots, kt.TEMP, mode, center, col_scale, col_bias)
    assert probs.dtype == torch.float32
    kt.assert_flash_rule("probs", probs, p64, p_t, torch.float32)
    kt.assert_flash_rule("row_entropy", entropy, e64, e_t, torch.float32)
    assert torch.equal(argmax, probs.argmax(dim=1))  # the argmax of the rows it wrote (first maximum)
    if s64 is None:
        assert stat is None
    else:
        kt.assert_flash_rule("stat", stat, s64, s_t, torch.float32)


@pytest.mark.parametrize("mode", ["logit", "prob", "none", "sinkhorn"])
@pytest.mark.parametrize("K", [333, 4099])
def test_teacher_rows_modes(mode, K):
    check_teacher_rows(teacher_case(6, K, torch.float32, mode), mode)


@pytest.mark.parametrize("mode", ["logit", "prob", "sinkhorn"])
def test_teacher_rows_in_place_and_without_vectors(mode):
    check_teacher_rows(teacher_case(5, 333, torch.float32, mode), mode, in_place=True)
    check_teacher_rows(teacher_case(5, 333, torch.float32, mode, scale=False, bias=False), mode)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", ["logit", "prob", "sinkhorn"])
def test_teacher_rows_low_precision(dtype, mode):
    check_teacher_rows(teacher_case(4, 4099, dtype, mode), mode)


@pytest.mark.parametrize("K", [65536, 131072])
def test_teacher_rows_wide(K):
    check_teacher_rows(teacher_case(2, K, torch.float32, "prob"), "prob")


def test_teacher_rows_argmax_ties_take_the_lowest_index():
    dots = torch.zeros(3, 4099)
    dots[1, [7, 3000]] = 1.0  # a tie across two tiles
    dots[2, [2050, 2051]] = 1.0  # a tie inside one tile, off the first SIMD lane
    _, _, _, argmax = teacher_rows_cpp(dots, 0.1, "none")
    assert argmax.tolist() == [0, 7, 2050]


@pytest.mark.parametrize("S,T", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_dino_cross_entropy_on_cpp(S, T, dtype):
    kt.check_cross_entropy(functools.partial(dino_cross_entropy, backend="cpp"), S, T, 3, 4099, dtype)


def test_dino_cross_entropy_on_cpp_issue_width():
    kt.check_cross_entropy(functools.partial(dino_cross_entropy, backend="cpp"), 12, 2, 2, 65536, torch.float32)


@pytest.mark.parametrize("mode", ["logit", "prob", "none", "sinkhorn"])
def test_teacher_distribution_on_cpp(mode):
    fn = functools.partial(teacher_distribution, backend="cpp")
    kt.check_teacher(fn, 6, 4099, torch.float32, mode)
    kt.check_teacher(fn, 4, 333, torch.bfloat16, mode)
    kt.check_teacher(fn, 4, 333, torch.float32, mode, vmf=False)
    kt.check_teacher(fn, 4, 333, torch.float32, mode, p=16)


@pytest.mark.parametrize("isa", ["sse2", "avx2"])
def test_narrower_simd_paths_match_float64(isa):
    """The extension carries AVX-512, AVX2 and SSE2 builds of its loops and runs the best one the CPU has;
    cap it in a subprocess so every path is checked (on a CPU without the wider ones this repeats a path)."""
    code = ("import torch, functools; from dinovmf.loss import dino_cross_entropy as ce; "
            "from dinovmf.centering import teacher_distribution as td; "
            "import sys; sys.path.insert(0, 'tests'); import test_kernels_cpp as t; "
            "import _kernel_checks as kt; "
            "kt.check_cross_entropy(functools.partial(ce, backend='cpp'), 4, 2, 2, 4099, torch.float32); "
            "t.check_ce_rows(t.ce_rows_case(4, 2, 3, 333, torch.bfloat16, weights=False), torch.bfloat16); "
            "t.check_ce_rows(t.ce_rows_case(1, 1, 5, 4099, torch.float32, same_view=True, weights=True), torch.float32); "
            "[t.check_teacher_rows(t.teacher_case(3, 4099, torch.float32, m), m) for m in ('logit', 'prob', 'sinkhorn')]; "
            "t.test_teacher_rows_argmax_ties_take_the_lowest_index(); "
            "import test_head_loss as h; h.test_kmajor_lane_vectors_within_and_across_views('prob', 32); "
            "h.test_kmajor_lane_vectors_within_and_across_views('logit', 20); h.test_multi_tile_rows('sinkhorn'); "
            "h.test_kmajor_teacher_argmax_ties_take_the_lowest_index()")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code += "; from dinovmf._ext import load_extension; print(load_extension().cpu_isa())"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DINOVMF_CPU_ISA": isa},
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] in (isa, "sse2")  # the cap, or less on a CPU without it
