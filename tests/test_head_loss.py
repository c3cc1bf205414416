"""The fused head-to-loss op (dinovmf.head_loss) against its float64 autograd definition
(dinovmf.loss_reference.head_to_loss_reference): loss, gradients w.r.t. z_s, W or (v, g), the centre
statistic and the metric by-products, over every pairing layout, centering mode, vmf on/off, both
prototype forms, fp32 and bf16, the torch and cpp row kernels, chunk boundaries and multi-tile K.

Tolerances follow the flash rule of `tests/_kernel_checks.py`: the op's error against float64 may be at
most 2x the error of the same-dtype eager reference, with a floor of a few output ulps.
"""
import pytest
import torch
import torch.nn.functional as F

from dinovmf import backends
from dinovmf.cpu_memory import kept_bytes, release_kept
from dinovmf.head_loss import chunk_rows, head_to_loss, image_major_order
import _kernel_checks as kt
from dinovmf.loss_reference import head_to_loss_reference

LAYOUTS = [(12, 2), (2, 2), (4, 1)]  # (S student views, T teacher views)
MODES = ["logit", "prob", "none", "sinkhorn"]
KERNEL_BACKENDS = ["cpp", "torch"]  # the op's row kernels; the oracle is float64 autograd, never a backend
P_DIM, B = 24, 3
TAU_S, TAU_T = 0.1, 0.04


def make_case(S, T, K, vg: bool, mode: str, seed: int = 0, n_student=None, n_teacher=None):
    """Float64 inputs: unit rows, prototypes with norms in [0.5, 2], a teacher near the student, a center."""
    g = torch.Generator().manual_seed(seed)
    n_s, n_t = n_student or S * B, n_teacher or T * B
    zs = F.normalize(torch.randn(n_s, P_DIM, generator=g, dtype=torch.float64), dim=1)
    zt = F.normalize(torch.randn(n_t, P_DIM, generator=g, dtype=torch.float64), dim=1)
    v = torch.randn(K, P_DIM, generator=g, dtype=torch.float64)
    gain = torch.rand(K, generator=g, dtype=torch.float64) * 1.5 + 0.5
    vt = v + 0.05 * torch.randn(K, P_DIM, generator=g, dtype=torch.float64)
    gt = gain * (1 + 0.02 * torch.randn(K, generator=g, dtype=torch.float64))
    if mode == "prob":
        center = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    elif mode == "logit":
        center = torch.randn(K, generator=g, dtype=torch.float64) * 0.1
    else:
        center = None
    if vg:
        return zs, zt, (v, gain), (vt, gt), center
    return zs, zt, F.normalize(v, dim=1) * gain[:, None], F.normalize(vt, dim=1) * gt[:, None], center


def _cast(x, dtype, grad):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype, grad) for t in x)
    return x.detach().to(dtype).requires_grad_(grad)


def _leaves(zs, proto):
    return (zs,) + (proto if isinstance(proto, tuple) else (proto,))


def run(fn, case, dtype, **kw):
    """(output, gradients of the loss w.r.t. z_s and the student prototypes) of `fn` on `case` in `dtype`."""
    zs, zt, ps, pt, center = case
    zs, ps = _cast(zs, dtype, True), _cast(ps, dtype, True)
    zt, pt = _cast(zt, dtype, False), _cast(pt, dtype, False)
    c = None if center is None else center.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out = fn(zs, zt, ps, pt, student_temp=TAU_S, teacher_temp=TAU_T, center=c, **kw)
    grads = torch.autograd.grad(out.loss * 1.7, _leaves(zs, ps))  # 1.7: backward scales by grad_output
    return out, grads


NAMES = ("dz", "dv_or_dW", "dg")


def rounded(case, dtype):
    """The case as `dtype` sees it, back in float64: the oracle computes on the very inputs the op gets."""
    def r(x):
        if x is None or isinstance(x, tuple):
            return None if x is None else tuple(r(t) for t in x)
        return x.to(dtype).double()
    return tuple(r(x) for x in case[:4]) + (case[4],)


def check_against_float64(case, dtype, backend, chunk_bytes, **kw):
    case = rounded(case, dtype)
    ref64, g64 = run(head_to_loss_reference, case, torch.float64, **kw)
    ref_t, g_t = run(head_to_loss_reference, case, dtype, **kw)  # the same-dtype eager reference
    out, g_op = run(head_to_loss, case, dtype, backend=backend, chunk_bytes=chunk_bytes, **kw)
    # bf16 inputs: the op and the eager reference both round the GEMM output (the logits, the teacher dots)
    # to bf16, so every output inherits one bf16 rounding: the floor is bf16's for all of them.
    floor = torch.float32 if dtype == torch.float32 else dtype
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    kt.assert_flash_rule("loss", out.loss, ref64.loss, ref_t.loss, floor)
    for name, a, a64, at in zip(NAMES, g_op, g64, g_t):
        assert a.dtype == dtype, f"{name}: gradient dtype {a.dtype} != input dtype {dtype}"
        kt.assert_flash_rule(name, a, a64, at, floor)
    for name in ("teacher_probs", "teacher_entropy", "student_entropy", "kappa"):
        kt.assert_flash_rule(name, getattr(out, name), getattr(ref64, name), getattr(ref_t, name), floor)
    if ref64.center_stat is None:
        assert out.center_stat is None
    else:
        kt.assert_flash_rule("center_stat", out.center_stat, ref64.center_stat, ref_t.center_stat, floor)
    # argmax: a maximum of the float64 teacher row, up to the probabilities' own tolerance (near-ties).
    p64 = ref64.teacher_probs
    picked = p64.gather(1, out.teacher_argmax[:, None]).squeeze(1)
    assert (picked >= p64.max(dim=1).values - 1e-5 * p64.max()).all()
    return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("vg", [True, False], ids=["v_g", "W"])
@pytest.mark.parametrize("vmf", [True, False], ids=["vmf", "dino"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("S,T", LAYOUTS)
def test_fp32_matches_float64(S, T, mode, vmf, vg, backend):
    # K = 333: one partial tile, not a multiple of the SIMD width; 5-row chunks: N = 36 ends in a 1-row chunk.
    K = 333
    case = make_case(S, T, K, vg, mode, seed=S * 10 + T)
    check_against_float64(case, torch.float32, backend, chunk_bytes=5 * K * 4, centering=mode, vmf=vmf, n_global=T)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vg,vmf", [(True, True), (False, False)], ids=["v_g-vmf", "W-dino"])
def test_triton_op_matches_float64(mode, vg, vmf):
    """The whole op on the Triton row kernels, as a GPU runs it (here through the interpreter)."""
    from dinovmf import backends

    if "triton" not in backends.available_backends("cpu"):
        pytest.skip("triton runs on CPU only under TRITON_INTERPRET=1")
    K = 333
    case = make_case(4, 2, K, vg, mode, seed=3)
    check_against_float64(case, torch.float32, "triton", chunk_bytes=5 * K * 4, centering=mode, vmf=vmf, n_global=2)


@pytest.mark.parametrize("mode", MODES)
def test_multi_tile_rows(mode):
    # K = 2 full 2048-wide tiles + a 37-wide tail in the C++ kernels; 7-row chunks over 36 rows.
    K = 4133
    case = make_case(12, 2, K, True, mode, seed=1)
    check_against_float64(case, torch.float32, "cpp", chunk_bytes=7 * K * 4, centering=mode, vmf=True, n_global=2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [32, 20], ids=["lane-aligned", "straddling"])
def test_kmajor_lane_vectors_within_and_across_views(mode, rows):
    """fp32 on the CPU runs k-major (csrc/dino_loss_kmajor.cpp), one SIMD lane per row. With B = 16 images
    and 32-row chunks a lane vector is consecutive images of one view (teacher terms loaded contiguously);
    20-row chunks make vectors straddle two views and pad the last one (the gather path). K = 4133 gives
    several tiles of the [K, C] matrices on both sides."""
    K = 4133
    case = make_case(4, 2, K, True, mode, seed=5, n_student=4 * 16, n_teacher=2 * 16)
    check_against_float64(case, torch.float32, "cpp", chunk_bytes=rows * K * 4, centering=mode, vmf=True, n_global=2)


def test_kmajor_same_view_lane_vectors_read_their_teacher_rows_contiguously():
    n, K = 40, 2100
    case = make_case(1, 1, K, True, "prob", seed=6, n_student=n, n_teacher=n)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(7)).float() + 0.1
    check_against_float64(case, torch.float32, "cpp", chunk_bytes=16 * K * 4, centering="prob", vmf=True,
                          same_view=True, row_weight=weights)


def test_kmajor_teacher_argmax_ties_take_the_lowest_index():
    """Tied maxima within a tile (3 and 10) and across tiles (4500, in the second of the k-major teacher's
    tiles): the argmax is the first, as torch.argmax gives it."""
    K, p = 5000, 8
    v = torch.randn(K, p, generator=torch.Generator().manual_seed(11)) * 0.1
    top = torch.zeros(p)
    top[0] = 3.0
    for k in (3, 10, 4500):
        v[k] = top
    zt = torch.zeros(6, p)
    zt[:, 0] = 1.0
    zs = F.normalize(torch.randn(12, p, generator=torch.Generator().manual_seed(12)), dim=1)
    out = head_to_loss(zs, zt, v, v, student_temp=TAU_S, teacher_temp=TAU_T, centering="none", vmf=False,
                       n_global=2, backend="cpp")
    assert out.teacher_argmax.tolist() == [3] * 6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode,vg", [("prob", True), ("logit", False), ("sinkhorn", True)])
def test_bf16_inputs(mode, vg, backend):
    K = 333
    case = make_case(4, 2, K, vg, mode, seed=2)
    check_against_float64(case, torch.bfloat16, backend, chunk_bytes=5 * K * 2, centering=mode, vmf=True, n_global=2)


@pytest.mark.parametrize("vg", [True, False], ids=["v_g", "W"])
@pytest.mark.parametrize("mode", MODES)
def test_float64_path_equals_autograd(mode, vg):
    """The host algebra (chunks, image-major order, col scale, dv/dg from U, the bias gradient) is exact:
    in float64 the op on the torch kernels equals autograd of the definition to rounding."""
    case = make_case(12, 2, 333, vg, mode, seed=3)
    ref, g_ref = run(head_to_loss_reference, case, torch.float64, centering=mode, vmf=True, n_global=2)
    out, g_op = run(head_to_loss, case, torch.float64, backend="torch", chunk_bytes=5 * 333 * 8, centering=mode,
                    vmf=True, n_global=2)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(NAMES, g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)
    torch.testing.assert_close(out.student_entropy, ref.student_entropy, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_same_view_pairing_with_row_weights(backend, mode):
    """iBOT's patch loss: student row i against teacher row i, loss = sum w ce / sum w."""
    n = 17
    case = make_case(1, 1, 333, True, mode, seed=4, n_student=n, n_teacher=n)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
    for w in (None, weights):
        check_against_float64(case, torch.float32, backend, chunk_bytes=4 * 333 * 4, centering=mode, vmf=True,
                              same_view=True, row_weight=None if w is None else w.float())


def test_zero_gain_prototype_gradient_is_exact():
    """g_k = 0 (a dead plain-DINO prototype): dg_k = M_k . v^_k is still exact (the column scale's floor)."""
    zs, zt, (v, g), pt, center = make_case(4, 2, 333, True, "logit", seed=6)
    g = g.clone()
    g[[0, 100]] = 0.0
    case = (zs, zt, (v, g), pt, center)
    ref, g_ref = run(head_to_loss_reference, case, torch.float64, centering="logit", vmf=False, n_global=2)
    out, g_op = run(head_to_loss, case, torch.float64, backend="torch", centering="logit", vmf=False, n_global=2)
    assert g_ref[2][[0, 100]].abs().min() > 0  # the test can fail: these gradients are not zero
    torch.testing.assert_close(g_op[2], g_ref[2], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_op[1], g_ref[1], rtol=1e-10, atol=1e-14)


def test_frozen_gain_gives_no_g_gradient_and_exact_v_gradient():
    """DINO's norm_last_layer: g does not train; only v gets a gradient."""
    zs, zt, (v, g), pt, center = make_case(4, 2, 333, True, "logit", seed=7)
    zs32, v32, g32 = zs.float().requires_grad_(), v.float().requires_grad_(), g.float()
    out = head_to_loss(zs32, zt.float(), (v32, g32), tuple(x.float() for x in pt), student_temp=TAU_S,
                       teacher_temp=TAU_T, centering="logit", center=center.float(), n_global=2, backend="cpp")
    out.loss.backward()
    assert g32.grad is None and v32.grad is not None and zs32.grad is not None
    z64, v64 = zs.clone().requires_grad_(), v.clone().requires_grad_()
    ref = head_to_loss_reference(z64, zt, (v64, g), pt, student_temp=TAU_S, teacher_temp=TAU_T, centering="logit",
                                 center=center, n_global=2)
    ref.loss.backward()
    assert kt.max_abs_err(v32.grad, v64.grad) <= 1e-5 * v64.grad.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-kmajor", "bf16-rows"])
def test_no_grad_path_does_no_gradient_work(monkeypatch, dtype):
    """Under no_grad (and for inputs that need no grad) the kernels get no gradient buffers: fp32 runs the
    k-major `ce_cols`, bf16 the row-major `ce_rows`."""
    from dinovmf import _ext
    calls = []
    if dtype == torch.float32:
        real = _ext.ce_cols_cpp

        def spy(*args):
            calls.append((not args[11], args[12] is None))  # write_grad, col_grad_sum
            return real(*args)
        monkeypatch.setattr(_ext, "ce_cols_cpp", spy)
    else:
        real = backends.ce_rows_impl("cpp")

        def spy(*args):
            calls.append((args[10] is None, args[11] is None))  # grad_out, col_grad_sum
            return real(*args)
        monkeypatch.setattr(backends, "ce_rows_impl", lambda name: spy)
    case = make_case(4, 2, 333, True, "prob", seed=8)
    zs, zt, ps, pt = (_cast(x, dtype, i in (0, 2)) for i, x in enumerate(case[:4]))
    center = case[4].float()
    kw = dict(student_temp=TAU_S, teacher_temp=TAU_T, centering="prob", center=center, n_global=2, backend="cpp")
    with torch.no_grad():
        out = head_to_loss(zs, zt, ps, pt, **kw)
    assert out.loss.grad_fn is None and calls and all(a and b for a, b in calls)
    calls.clear()
    with_grad = head_to_loss(zs, zt, ps, pt, **kw)
    assert with_grad.loss.grad_fn is not None and calls and all(not a and not b for a, b in calls)
    assert out.loss.item() == with_grad.loss.item()  # the same kernels either way: bitwise equal


def test_backward_scales_by_grad_output_and_runs_once():
    case = make_case(4, 2, 333, True, "logit", seed=9)
    kw = dict(centering="logit", vmf=True, n_global=2, backend="cpp")
    _, g1 = run(head_to_loss, case, torch.float32, **kw)  # run() backpropagates 1.7 * loss
    zs, zt, ps, pt, center = case
    zs32, ps32 = _cast(zs, torch.float32, True), _cast(ps, torch.float32, True)
    out = head_to_loss(zs32, zt.float(), ps32, _cast(pt, torch.float32, False), student_temp=TAU_S,
                       teacher_temp=TAU_T, center=center.float(), **kw)
    g1_again = torch.autograd.grad(out.loss * 1.7, _leaves(zs32, ps32), retain_graph=True)
    for a, b in zip(g1, g1_again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic, and scaled by exactly 1.7
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out.loss, _leaves(zs32, ps32))


def test_chunking_and_row_order_do_not_change_the_result():
    """One chunk, many chunks, any size: the same result up to GEMM blocking (BLAS rounds a 1-row product
    differently from a 35-row one)."""
    case = make_case(12, 2, 333, True, "prob", seed=10)
    kw = dict(centering="prob", vmf=True, n_global=2, backend="cpp")
    whole, g_whole = run(head_to_loss, case, torch.float32, chunk_bytes=1 << 30, **kw)
    for rows in (1, 7, 35):
        part, g_part = run(head_to_loss, case, torch.float32, chunk_bytes=rows * 333 * 4, **kw)
        torch.testing.assert_close(part.student_entropy, whole.student_entropy, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(part.loss, whole.loss, rtol=1e-6, atol=0)  # the final sum's order only
        for a, b in zip(g_part, g_whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # BLAS blocking of the dW sum differs


def test_chunk_rows_fits_the_budget_and_evens_out():
    assert chunk_rows(768, 65536, 4, 32 * 2 ** 20) == 128
    assert chunk_rows(770, 65536, 4, 32 * 2 ** 20) == 110  # 7 chunks of <= 110 rows, not 6 x 128 + 2
    assert chunk_rows(768, 256, 4, 32 * 2 ** 20) == 768
    assert chunk_rows(5, 10 ** 9, 4, 1) == 1
    with pytest.raises(ValueError, match="chunk_bytes"):
        chunk_rows(5, 10, 4, 0)


def test_cpu_buffers_are_reused_once_the_gradients_are_dropped():
    """On the CPU the op's large buffers are kept (dinovmf.cpu_memory): a second call while the first call's
    gradients live gets other memory; once they are dropped, the same memory again."""
    kw = dict(centering="prob", vmf=True, n_global=2, backend="cpp")
    case = make_case(12, 2, 333, True, "prob", seed=3)
    release_kept()
    _, grads = run(head_to_loss, case, torch.float32, **kw)
    first = grads[1].data_ptr()
    _, held = run(head_to_loss, case, torch.float32, **kw)
    second = held[1].data_ptr()
    assert second != first  # the first gradient still lives: its buffer is not handed out
    del grads, held
    _, again = run(head_to_loss, case, torch.float32, **kw)
    assert again[1].data_ptr() in (first, second) and kept_bytes() > 0


def test_kept_buffers_do_not_leak_between_calls():
    """Calls of different sizes through the kept buffers give what fresh buffers give, and what the op
    returned (teacher probabilities, gradients: kept buffers themselves) is never overwritten while held."""
    kw = dict(centering="prob", vmf=True, n_global=2, backend="cpp", chunk_bytes=5 * 333 * 4)
    big, small = make_case(12, 2, 333, True, "prob", seed=3), make_case(4, 2, 96, True, "prob", seed=4)
    first, g_first = run(head_to_loss, big, torch.float32, **kw)
    kept = [t.clone() for t in (first.teacher_probs, first.student_entropy, *g_first)]
    run(head_to_loss, small, torch.float32, **kw)  # reuses (and overwrites) the kept buffer
    for a, b in zip((first.teacher_probs, first.student_entropy, *g_first), kept):
        assert torch.equal(a, b)
    again, g_again = run(head_to_loss, big, torch.float32, **kw)
    assert torch.equal(again.loss, first.loss)
    for a, b in zip(g_again, g_first):
        assert torch.equal(a, b)


def test_image_major_order():
    assert image_major_order(3, 2, "cpu").tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_global=5), "n_global"),
    (dict(student_z=torch.randn(13, P_DIM)), "student_z"),
    (dict(teacher_prototypes=torch.randn(20, P_DIM)), "teacher_prototypes"),
    (dict(student_prototypes=(torch.randn(33, P_DIM), torch.ones(32))), "g must have shape"),
    (dict(student_prototypes=[torch.randn(33, P_DIM)]), "student_prototypes"),
    (dict(student_z=torch.randn(12, P_DIM, dtype=torch.float64)), "share a dtype"),
    (dict(row_weight=torch.ones(12)), "same_view"),
    (dict(centering="median"), "mode"),
    (dict(student_temp=0.0), "student_temp"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(student_z=torch.randn(12, P_DIM), teacher_z=torch.randn(6, P_DIM),
                student_prototypes=torch.randn(33, P_DIM), teacher_prototypes=torch.randn(33, P_DIM),
                student_temp=TAU_S, teacher_temp=TAU_T, centering="none", n_global=2, backend="cpp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        head_to_loss(**args)


def test_float64_needs_the_reference_backend():
    args = (torch.randn(12, P_DIM, dtype=torch.float64), torch.randn(6, P_DIM, dtype=torch.float64),
            torch.randn(33, P_DIM, dtype=torch.float64), torch.randn(33, P_DIM, dtype=torch.float64))
    kw = dict(student_temp=TAU_S, teacher_temp=TAU_T, centering="none", n_global=2)
    assert head_to_loss(*args, **kw).loss.dtype == torch.float64  # "auto" picks the float64 reference
    with pytest.raises(ValueError, match="backend='torch'"):
        head_to_loss(*args, backend="cpp", **kw)


def test_weight_norm_backward_one_pass_matches_float64():
    """The C++ one-pass (fp32 CPU) and the torch two-op forms of u <- u - (u.v/|v|^2) v, dots u.v."""
    from dinovmf.head_loss import weight_norm_backward_
    g = torch.Generator().manual_seed(11)
    u, v = torch.randn(1000, 37, generator=g, dtype=torch.float64), torch.randn(1000, 37, generator=g, dtype=torch.float64)
    norm = v.norm(dim=1)
    want_dot = (u * v).sum(1)
    want_u = u - (want_dot / norm ** 2)[:, None] * v
    for dtype in (torch.float32, torch.float64):  # fp32: the C++ pass; float64: the torch ops
        got_u = u.to(dtype).clone()
        got_dot = weight_norm_backward_(got_u, v.to(dtype), norm.to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got_dot.double(), want_dot, rtol=tol, atol=tol * want_dot.abs().max().item())
        torch.testing.assert_close(got_u.double(), want_u, rtol=tol, atol=tol * want_u.abs().max().item())


def test_serial_vector_math_restores_the_thread_count():
    from dinovmf.kernels.common import serial_vector_math
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with serial_vector_math(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError):
            with serial_vector_math(torch.device("cpu")):
                raise KeyError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
