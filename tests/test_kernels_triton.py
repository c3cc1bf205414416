"""The Triton backend against float64 oracles. On CPU it runs under TRITON_INTERPRET=1 (set by conftest),
which executes every program in numpy at a cost per tile op: rows and K stay small, each case chosen to
hit one code path (DINO and same-view pairing, weights, col_scale / bias on and off, gradient in place /
out of place / none, col_grad_sum, every centering mode, fp32 / bf16 / fp16, K not a multiple of the
block, rows in arbitrary order, the GPU's 256-column geometry and several row groups); K = 65536 appears
once per contract op. The per-logits API runs through the public `dino_cross_entropy` /
`teacher_distribution` with backend="triton" (host code shared by every backend). On a GPU (`make
gpu-check`) the same tests run there, with the tolerance widened by the bound on what the GPU's
approximate exp adds (`_kernel_checks.gpu_exp_error`)."""
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import _kernel_checks as kt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
# The interpreter stores fp32 -> bf16 by truncation, the GPU rounds to nearest (kt.interpreter_store_error).
INTERPRETED = dict(truncating_bf16_store=DEVICE == "cpu")
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")


@pytest.fixture(scope="module")
def ops():
    from dinovmf.kernels import triton_ops
    return triton_ops


def _with_plan(fn, **plan_kwargs):
    """`fn` (ce_rows / teacher_rows) run on a forced launch geometry (kernels.tiling.column_plan)."""
    from dinovmf.kernels import tiling

    def run(x, *args):
        return fn(x, *args, plan=tiling.column_plan(x.shape[0], x.shape[1], x.device, x.element_size(),
                                                    **plan_kwargs))
    return run


# The GPU's launch geometry (kernels.tiling), at K ~ 1000: 4-step ranges and 256-column stream blocks.
GPU_GEOMETRY = dict(groups=2, stats_step=128, stats_range=512, stream_block=256)


def _shuffled_rows(n_all, c, seed=0):
    return torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:c]


# ------------------------------------------------------------------------------------------ ce_rows
CE_CASES = {
    "dino-every-input-in-place": (4, 2, 3, 333, torch.float32, {}),
    "dino-bf16-out-of-place": (3, 1, 2, 4099, torch.bfloat16, dict(grad="out", row_weight=False, col_scale=False)),
    "dino-bf16-in-place-bias-only": (4, 2, 2, 333, torch.bfloat16, dict(col_scale=False, row_weight=False)),
    "dino-fp16-in-place": (2, 2, 2, 333, torch.float16, dict(bias=False)),
    "dino-12-2-stats-only": (12, 2, 2, 333, torch.float32,
                             dict(grad=None, col_grad_sum=False, col_scale=False, bias=False, row_weight=False)),
    "dino-col-grad-sum-without-grad": (2, 2, 2, 333, torch.float32, dict(grad=None)),
    "dino-grad-without-col-grad-sum": (4, 1, 2, 4099, torch.float32, dict(col_grad_sum=False)),
    "dino-rows-in-any-order": (4, 2, 5, 333, torch.float32, dict(rows=_shuffled_rows(20, 13))),
    "same-view-rows-in-any-order": (3, 1, 4, 333, torch.float32, dict(same_view=True, rows=_shuffled_rows(12, 9))),
}


@pytest.mark.parametrize("case", CE_CASES)
def test_ce_rows_against_float64(ops, case):
    S, T, B, K, dtype, kwargs = CE_CASES[case]
    kt.check_ce_rows(ops.ce_rows_triton, S, T, B, K, dtype, device=DEVICE, **INTERPRETED, **kwargs)


def test_ce_rows_gpu_geometry(ops):
    """The GPU's 128-column steps over 512-column ranges (online rescaling across steps), 256-column
    stream blocks and two row groups (column sums as per-group partials)."""
    fn = _with_plan(ops.ce_rows_triton, **GPU_GEOMETRY)
    kt.check_ce_rows(fn, 4, 2, 10, 1000, torch.float32, device=DEVICE)
    kt.check_ce_rows(fn, 3, 1, 8, 1000, torch.bfloat16, same_view=True, grad="out", device=DEVICE, **INTERPRETED)


def test_ce_rows_merges_more_blocks_than_one_finish_step(ops):
    """38 ranges of 16 columns: the finish kernel merges them in two steps of FINISH_BLOCK_J = 32."""
    fn = _with_plan(ops.ce_rows_triton, stats_step=16, stats_range=16, stream_block=64)
    kt.check_ce_rows(fn, 2, 2, 2, 600, torch.float32, device=DEVICE)


def test_ce_rows_issue_width(ops):
    kt.check_ce_rows(ops.ce_rows_triton, 12, 2, 1, 65536, torch.bfloat16, device=DEVICE, **INTERPRETED)


def test_ce_rows_reference_is_the_definition():
    """The float64 reference against autograd of the loss as defined: grad_scale * sum_i w_i * sum over
    the paired teacher rows of -sum_k P log_softmax(l_i), l = logits * col_scale + bias."""
    S, T, B, K, gs = 4, 2, 3, 50, 0.37
    for same_view in (False, True):
        logits, cs, b, P, ri, w = kt.ce_rows_inputs(S, T, B, K, torch.float64, same_view=same_view,
                                                    rows=_shuffled_rows(S * B, 7))
        stats, grad, colsum = kt.ce_rows_reference(logits, cs, b, P, ri, B, T, same_view, w, gs)
        x, bias = logits.clone().requires_grad_(), b.double().requires_grad_()
        log_q = torch.log_softmax(x * cs.double() + bias, 1)
        if same_view:
            ce = -(P.double()[ri] * log_q).sum(1)
        else:
            s, bb = ri // B, ri % B
            ce = sum(-(P.double()[t * B + bb] * log_q).sum(1) * (s != t) for t in range(T))
        (gs * (w.double() * ce).sum()).backward()
        torch.testing.assert_close(stats[0], ce.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(colsum, bias.grad, rtol=1e-12, atol=1e-12)
        ent = -(log_q.exp() * log_q).sum(1).detach()
        torch.testing.assert_close(stats[1] - stats[3], ent, rtol=1e-12, atol=1e-12)


def test_ce_rows_rejects_bad_arguments_by_name(ops):
    logits, cs, b, P, ri, w = kt.ce_rows_inputs(2, 2, 2, 8, torch.float32)
    ok = [logits, cs, b, P, ri, 2, 2, False, w, 1.0, None, None]

    def call(**changes):
        names = ["logits", "col_scale", "bias", "teacher_probs", "row_index", "B", "T", "same_view", "row_weight",
                 "grad_scale", "grad_out", "col_grad_sum"]
        args = [changes.get(n, v) for n, v in zip(names, ok)]
        return ops.ce_rows_triton(*args)

    for name, bad in [("logits", logits[0]), ("logits", logits.double()), ("teacher_probs", P[:, :5]),
                      ("teacher_probs", P.double()), ("col_scale", cs[:5]), ("bias", b.double()),
                      ("row_index", ri.int()), ("row_weight", w[:1]), ("grad_out", logits.bfloat16()),
                      ("col_grad_sum", torch.zeros(9)), ("logits", logits.t()), ("B", 0)]:
        with pytest.raises(ValueError, match=name):
            call(**{name: bad})
    with pytest.raises(ValueError, match="T\\*B"):
        call(T=1)


# ------------------------------------------------------------------------------------- teacher_rows
TEACHER_CASES = {
    "logit-scale-bias": (5, 333, torch.float32, "logit", {}),
    "prob-scale-bias-in-place": (5, 4099, torch.float32, "prob", dict(inplace=True)),
    "none-bf16": (5, 333, torch.bfloat16, "none", dict(col_scale=False)),
    "sinkhorn-scale-bias": (6, 4099, torch.float32, "sinkhorn", {}),
    "sinkhorn-bf16-plain": (6, 333, torch.bfloat16, "sinkhorn", dict(col_scale=False, bias=False)),
    "logit-bf16-bias-only": (3, 333, torch.bfloat16, "logit", dict(col_scale=False)),
    "prob-fp16-scale-only": (3, 333, torch.float16, "prob", dict(bias=False)),
    "logit-plain-in-place": (3, 333, torch.float32, "logit", dict(col_scale=False, bias=False, inplace=True)),
}


@pytest.mark.parametrize("case", TEACHER_CASES)
def test_teacher_rows_against_float64(ops, case):
    N, K, dtype, mode, kwargs = TEACHER_CASES[case]
    kt.check_teacher_rows(ops.teacher_rows_triton, N, K, dtype, mode, device=DEVICE, **kwargs)


@pytest.mark.parametrize("mode", ["logit", "prob", "sinkhorn"])
def test_teacher_rows_gpu_geometry(ops, mode):
    """The GPU's tiles and two row groups: the stat and the Sinkhorn column LSE as group partials."""
    kt.check_teacher_rows(_with_plan(ops.teacher_rows_triton, **GPU_GEOMETRY), 40, 1000, torch.float32, mode,
                          device=DEVICE)


def test_teacher_rows_issue_width(ops):
    kt.check_teacher_rows(ops.teacher_rows_triton, 2, 65536, torch.float32, "prob", inplace=True, device=DEVICE)


@pytest.mark.parametrize("step", [None, 64])
def test_teacher_rows_argmax_ties_take_the_lowest_index(ops, step):
    """Exact ties within one step and (step=64) across the steps of a range and across ranges: the
    lowest index wins."""
    dots = torch.zeros(3, 700)
    dots[0, [650, 70, 5, 300]] = 1.0
    dots[1, [699, 70]] = 1.0
    dots[2] = 0.5  # a flat row: every column ties
    fn = ops.teacher_rows_triton if step is None else \
        _with_plan(ops.teacher_rows_triton, stats_step=step, stats_range=2 * step)
    _, _, ent, arg = fn(dots.to(DEVICE), kt.TEMP, "none", None, None, None, None)
    assert arg.tolist() == [5, 70, 0]
    assert abs(ent[2].item() - torch.log(torch.tensor(700.0)).item()) < 1e-5


def test_teacher_rows_reference_matches_the_library_reference():
    """teacher_rows_reference with bias = vmf_column_bias(weight_norm) is dinovmf.centering's reference."""
    from dinovmf.vmf import vmf_column_bias
    for mode in ("logit", "prob", "none", "sinkhorn"):
        dots, center, wn = kt.teacher_inputs(4, 50, torch.float64, mode)
        c = center.double() if mode in ("logit", "prob") else None
        bias = vmf_column_bias(wn.double(), kt.TEMP, 256)
        probs, stat, ent, arg = kt.teacher_rows_reference(dots, kt.TEMP, mode, c, None, bias)
        probs_lib, stat_lib = kt.teacher_distribution_reference(dots, kt.TEMP, mode, c, wn.double(), 256)
        torch.testing.assert_close(probs, probs_lib, rtol=1e-12, atol=1e-14)
        if stat is not None:
            torch.testing.assert_close(stat, stat_lib, rtol=1e-12, atol=1e-14)
        assert torch.equal(arg, probs_lib.argmax(1))


def test_teacher_rows_rejects_bad_arguments_by_name(ops):
    d = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="out"):
        ops.teacher_rows_triton(d, 0.1, "none", None, None, None, torch.zeros(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="col_scale"):
        ops.teacher_rows_triton(d, 0.1, "none", None, torch.ones(7), None, None)
    with pytest.raises(ValueError, match="bias"):
        ops.teacher_rows_triton(d, 0.1, "none", None, None, torch.ones(8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="center"):
        ops.teacher_rows_triton(d, 0.1, "logit", None, None, None, None)
    with pytest.raises(ValueError, match="dots"):
        ops.teacher_rows_triton(d.t(), 0.1, "none", None, None, None, None)


# ------------------------------------------------------------------ row offsets past 2^31 elements
def _rows_2_31_apart(n, K, dtype, values):
    """An [n, K] view (filled with `values`) whose rows are 2^30 + 64 elements apart, so row 2 starts
    past element 2^31 of the view, inside a buffer that also covers 2^31 elements *before* the view:
    an offset wrapped in int32 lands there, on untouched (zero) pages, and the result is wrong rather
    than a crash. The buffer is virtual memory: only the pages of these rows are ever touched."""
    stride = 2 ** 30 + 64
    buf = torch.empty(2 ** 31 + (n - 1) * stride + K, dtype=dtype, device=DEVICE)
    x = buf[2 ** 31:].as_strided((n, K), (stride, 1))
    x.copy_(values)
    return x


def test_ce_rows_row_offsets_past_2_31_are_64_bit(ops):
    logits, cs, b, P, ri, w = kt.ce_rows_inputs(3, 2, 1, 40, torch.bfloat16, device=DEVICE)
    stats64, grad64, colsum64 = kt.ce_rows_reference(logits, cs, b, P, ri, 1, 2, False, w, 0.5)
    x = _rows_2_31_apart(3, 40, torch.bfloat16, logits)
    colsum = torch.zeros(40, device=DEVICE)
    stats = ops.ce_rows_triton(x, cs, b, P, ri, 1, 2, False, w, 0.5, x, colsum)
    torch.testing.assert_close(stats.double(), stats64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.double(), grad64, rtol=2 ** -8, atol=2 ** -8 * grad64.abs().max().item())
    torch.testing.assert_close(colsum.double(), colsum64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["none", "sinkhorn"])
def test_teacher_rows_row_offsets_past_2_31_are_64_bit(ops, mode):
    dots, _, cs, b = kt.teacher_rows_inputs(3, 40, torch.bfloat16, mode, device=DEVICE)
    probs64, _, ent64, _ = kt.teacher_rows_reference(dots, kt.TEMP, mode, None, cs, b)
    x = _rows_2_31_apart(3, 40, torch.bfloat16, dots)
    probs, _, ent, arg = ops.teacher_rows_triton(x, kt.TEMP, mode, None, cs, b, None)
    torch.testing.assert_close(probs.double(), probs64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.double(), ent64, rtol=1e-5, atol=1e-5)
    kt.assert_row_argmax(arg, probs64)


@GPU_ONLY
def test_contiguous_tensors_past_2_31_elements_on_gpu(ops):
    """Real [N, 65536] tensors of more than 2^31 elements: ce_rows (logits 4.3 GB bf16, graded in place,
    teacher 8.6 GB), teacher_rows and the Sinkhorn column LSE, checked on the rows past the boundary."""
    from dinovmf.kernels.teacher import _TeacherLaunch
    from dinovmf.kernels import tiling
    K, S, T, B = 65536, 2, 2, 16385  # S*B*K = 2^31 + 2^17
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(S * B, K, device="cuda", generator=g).bfloat16()
    P = torch.softmax(torch.randn(T * B, K, device="cuda", generator=g), 1)
    ri = torch.arange(S * B, device="cuda")
    tail = slice(S * B - 3, S * B)  # view 1 of the last 3 images: their teacher rows, as a 3-image batch
    P_tail = P.view(T, B, K)[:, B - 3:].reshape(T * 3, K)
    stats64, grad64, _ = kt.ce_rows_reference(logits[tail], None, None, P_tail, torch.arange(3, 6, device="cuda"),
                                              3, T, False, None, 1.0)
    stats = ops.ce_rows_triton(logits, None, None, P, ri, B, T, False, None, 1.0, logits, None)
    torch.testing.assert_close(stats[:, tail].double(), stats64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[tail].double(), grad64, rtol=2 ** -8, atol=2 ** -8 * grad64.abs().max().item())
    del P
    dots = torch.rand(S * B, K, device="cuda", generator=g).bfloat16()
    probs, _, _, _ = ops.teacher_rows_triton(dots, kt.TEMP, "none", None, None, None, None)
    torch.testing.assert_close(probs[tail].double(), torch.softmax(dots[tail].double() / kt.TEMP, 1), rtol=1e-5,
                               atol=1e-6)
    del probs
    v = torch.randn(S * B, device="cuda", generator=g)
    run = _TeacherLaunch(dots, kt.TEMP, None, None, tiling.column_plan(S * B, K, dots.device, dots.element_size()))
    got = run.column_lse(v)[:1024].double()
    ref = (dots[:, :1024].double() / kt.TEMP + v.double()[:, None]).logsumexp(0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# The compiled kernels (no GPU needed): the row offsets must be 64-bit in the IR the GPU runs, not only in
# numpy. (That every kernel compiles, with its can-be-1 integers as constants too, is tests/test_triton_aot.py.)
_OFFSETS_CHECK = textwrap.dedent("""
    import re
    from tools import triton_aot as aot
    from tools.triton_cases import cases

    aot.require_compile_mode()
    kernels = aot.discover(aot.kernel_modules())

    def i32_offsets_from_strides(ir):
        # tt.addptr ops whose offset derives from a row-stride argument but is not i64
        tainted, bad = set(), []
        for line in ir.splitlines():
            m = re.match(r"\\s*(%[\\w.]+)(?:#\\d+)? = ([\\w.]+) (.*)", line)
            if not m:
                continue
            res, op, body = m.group(1), m.group(2), m.group(3).split(" loc(")[0]
            operands = re.findall(r"%[\\w.]+", body.split(" : ")[0])
            if any(o.startswith("%stride") or o in tainted for o in operands):
                tainted.add(res)
            if op == "tt.addptr" and (operands[1].startswith("%stride") or operands[1] in tainted) \\
                    and not re.search(r"i64>?\\s*$", body):
                bad.append(line.strip())
        return bad

    seen = set()
    for c in cases():
        if not c.ci or c.specialized.keys() - {"visit_inner"} or c.kernel in seen \\
                or not any(a.startswith("stride") for a in c.signature):
            continue
        seen.add(c.kernel)
        bad = i32_offsets_from_strides(aot.compile_case(kernels[c.kernel], c, 90).ttir)
        assert not bad, f"{c.label}: 32-bit row offsets: {bad}"
    print("checked", sorted(seen))
""")


def test_compiled_kernels_keep_row_offsets_64_bit():
    """Compile for sm_90 in a subprocess (the interpreter must be off before triton is imported) the first CI
    case of each registry kernel that takes a row stride; in its TTIR every pointer offset derived from a
    stride must be i64."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _OFFSETS_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "_ce_grad_kernel" in r.stdout and "_column_lse_kernel" in r.stdout, r.stdout


# --------------------------------------------------------------- the per-logits API on top of them
def _public_ce():
    from dinovmf.loss import dino_cross_entropy
    return functools.partial(dino_cross_entropy, backend="triton")


def _public_teacher():
    from dinovmf.centering import teacher_distribution
    return functools.partial(teacher_distribution, backend="triton")


@pytest.mark.parametrize("S,T,K", [(12, 2, 333), (2, 2, 4099), (4, 1, 4099)])
def test_cross_entropy_layouts(S, T, K):
    kt.check_cross_entropy(_public_ce(), S, T, 2, K, torch.float32, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision(dtype):
    kt.check_cross_entropy(_public_ce(), 4, 2, 2, 4099, dtype, DEVICE, **INTERPRETED)


def test_cross_entropy_scales_by_the_upstream_gradient():
    """backward scales the gradient the forward computed by the upstream gradient."""
    logits, probs = kt.cross_entropy_inputs(3, 2, 2, 100, torch.float32, DEVICE)
    grads = []
    for scale in (1.0, -2.5):
        x = logits.clone().requires_grad_()
        (_public_ce()(x, probs) * scale).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], -2.5 * grads[0], rtol=1e-6, atol=1e-9)


def test_cross_entropy_visits_rows_image_major_with_the_same_result(ops):
    """The per-logits API asks ce_rows to walk the view-major rows image by image (visit_inner = S, a cache
    hint): on the GPU's geometry (two row groups, each visiting rows of several views), bitwise the same
    statistics and gradient as the plain order. (Every backend, CPU geometry: tests/test_backends.py.)"""
    from dinovmf.kernels import tiling

    S, T, B, K = 4, 2, 10, 1000
    logits, probs = kt.cross_entropy_inputs(S, T, B, K, torch.float32, DEVICE)
    x, P, rows = logits.view(S * B, K), probs.view(T * B, K), torch.arange(S * B, device=DEVICE)
    plan = tiling.column_plan(S * B, K, x.device, 4, **GPU_GEOMETRY)
    out = [torch.empty_like(x) for _ in range(2)]
    stats = [ops.ce_rows_triton(x, None, None, P, rows, B, T, False, None, 0.5, out[i], None, visit_inner=v, plan=plan)
             for i, v in enumerate((1, S))]
    assert torch.equal(stats[0], stats[1]) and torch.equal(out[0], out[1])


@pytest.mark.parametrize("mode", ["logit", "prob", "none", "sinkhorn"])
def test_teacher_modes_vmf(mode):
    kt.check_teacher(_public_teacher(), 3, 4099, torch.float32, mode, device=DEVICE)


@pytest.mark.parametrize("dtype,mode", [(torch.bfloat16, "logit"), (torch.float16, "prob")])
def test_teacher_low_precision(dtype, mode):
    kt.check_teacher(_public_teacher(), 3, 333, dtype, mode, device=DEVICE)


def test_teacher_plain_dino_and_small_p():
    kt.check_teacher(_public_teacher(), 3, 333, torch.float32, "logit", vmf=False, device=DEVICE)
    kt.check_teacher(_public_teacher(), 3, 333, torch.float32, "sinkhorn", p=16, device=DEVICE)
