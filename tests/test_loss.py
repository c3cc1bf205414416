"""The reference DINO cross-entropy against a plain loop over pairs, gradients, the per-logits
`dino_cross_entropy` on each backend's row kernel, and DINOLoss end to end (W and (v, g) prototypes,
device-tensor metrics)."""
import pytest
import torch
import torch.nn.functional as F

from dinovmf import backends
from dinovmf.centering import teacher_distribution_reference
from dinovmf.loss import DINOLoss, dino_cross_entropy, dino_cross_entropy_reference, patch_cross_entropy, prototype_logits
from dinovmf.prototypes import used_prototypes
from dinovmf.trainer import to_floats
from dinovmf.vmf import vmf_logits

LAYOUTS = [(12, 2), (2, 2), (4, 1)]  # (S student views, T teacher views)


def loop_cross_entropy(student_logits, teacher_probs):
    """The oracle: DESIGN §1 literally, one pair at a time, in float64."""
    s_views, t_views = student_logits.shape[0], teacher_probs.shape[0]
    total, pairs = 0.0, 0
    for t in range(t_views):
        for s in range(s_views):
            if s == t:
                continue
            log_q = torch.log_softmax(student_logits[s].double(), dim=-1)
            total = total + (-(teacher_probs[t].double() * log_q).sum(dim=-1)).mean()
            pairs += 1
    return total / pairs


def _inputs(s, t, b=3, k=11, dtype=torch.float64):
    logits = (torch.randn(s, b, k, dtype=dtype) * 3).requires_grad_()
    probs = torch.softmax(torch.randn(t, b, k, dtype=torch.float64) * 2, dim=-1).to(dtype)
    return logits, probs


@pytest.mark.parametrize("s, t", LAYOUTS)
def test_reference_matches_loop(seed, s, t):
    logits, probs = _inputs(s, t)
    got = dino_cross_entropy_reference(logits, probs)
    want = loop_cross_entropy(logits, probs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("s, t", LAYOUTS)
def test_reference_gradient_is_single_pass_form(seed, s, t):
    # dL/dl_s = (n_s softmax(l_s) - Pbar_s) / (|pairs| B)   (DESIGN §1)
    b = 3
    logits, probs = _inputs(s, t, b=b)
    grad, = torch.autograd.grad(dino_cross_entropy_reference(logits, probs), logits)
    pbar = probs.sum(0, keepdim=True).expand(s, -1, -1).clone()
    pbar[:t] -= probs
    n = torch.full((s, 1, 1), float(t), dtype=torch.float64)
    n[:t] -= 1
    want = (n * torch.softmax(logits.detach(), -1) - pbar) / (t * (s - 1) * b)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("s, t", LAYOUTS)
def test_reference_gradcheck_float64(seed, s, t):
    logits, probs = _inputs(s, t, b=2, k=5)
    assert torch.autograd.gradcheck(lambda l: dino_cross_entropy_reference(l, probs), (logits,))


def test_low_precision_logits_accumulate_in_float32(seed):
    logits, probs = _inputs(4, 2, k=64, dtype=torch.float64)
    want = loop_cross_entropy(logits, probs)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        got = dino_cross_entropy_reference(logits.detach().to(dtype), probs.float())
        assert got.dtype == torch.float32
        # Against the same low-precision inputs, evaluated exactly: only accumulation error remains.
        exact = loop_cross_entropy(logits.detach().to(dtype), probs.float())
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("s, t", LAYOUTS)
def test_rows_kernel_backends_match_the_loop(seed, s, t):
    """dino_cross_entropy on each backend's ce_rows kernel: value and gradient against the float64 loop."""
    logits, probs = _inputs(s, t, k=37)
    want = loop_cross_entropy(logits, probs)
    g_want, = torch.autograd.grad(want * 1.3, logits)
    for backend in backends.available_backends("cpu"):
        x = logits.detach().float().requires_grad_() if backend != "torch" else logits.detach().clone().requires_grad_()
        got = dino_cross_entropy(x, probs, backend=backend)
        g_got, = torch.autograd.grad(got * 1.3, x)
        tol = 1e-12 if backend == "torch" else 1e-5  # float64 on the reference kernel, fp32 in the others
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(g_got.double(), g_want, rtol=tol, atol=tol * g_want.abs().max().item())


def test_dispatch_errors(seed):
    logits, probs = _inputs(4, 2)
    with pytest.raises(backends.BackendUnavailable, match="unknown backend"):
        dino_cross_entropy(logits, probs, backend="fortran")
    with pytest.raises(backends.BackendUnavailable, match="unknown backend 'cuda'.*'triton'"):
        dino_cross_entropy(logits, probs, backend="cuda")  # GPUs run the Triton kernels


@pytest.mark.parametrize("bad, name", [
    (lambda l, p: (l[0], p), "student_logits"),
    (lambda l, p: (l, p[:, :2]), "teacher_probs"),
    (lambda l, p: (l[:1], p[:1]), "S >= 2"),
    (lambda l, p: (l[:2], torch.cat([p, p])), "T <= S"),
    (lambda l, p: (l.long(), p), "student_logits"),
])
def test_reference_bad_arguments(seed, bad, name):
    logits, probs = _inputs(4, 2)
    with pytest.raises(ValueError, match=name):
        dino_cross_entropy_reference(*bad(logits.detach(), probs))


def test_patch_cross_entropy_weighted_mean(seed):
    logits, probs = torch.randn(6, 7, dtype=torch.float64), torch.softmax(torch.randn(6, 7, dtype=torch.float64), -1)
    weights = torch.tensor([0.5, 0.5, 1.0, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64)
    rows = [-(probs[i] * torch.log_softmax(logits[i], -1)).sum() for i in range(6)]
    torch.testing.assert_close(patch_cross_entropy(logits, probs), sum(rows) / 6)
    torch.testing.assert_close(patch_cross_entropy(logits, probs, weights),
                               sum(w * r for w, r in zip(weights, rows)) / weights.sum())
    with pytest.raises(ValueError, match="weights"):
        patch_cross_entropy(logits, probs, weights[:3])


# ---------------------------------------------------------------------------------------------------
# DINOLoss
# ---------------------------------------------------------------------------------------------------
S, T, B, K, P = 4, 2, 3, 16, 8


def _heads(dtype=torch.float64):
    student_z = F.normalize(torch.randn(S * B, P, dtype=dtype), dim=1).requires_grad_()
    teacher_z = F.normalize(torch.randn(T * B, P, dtype=dtype), dim=1)
    student_w = (torch.randn(K, P, dtype=dtype) * torch.rand(K, 1, dtype=dtype) * 2).requires_grad_()
    teacher_w = student_w.detach() + 0.01 * torch.randn(K, P, dtype=dtype)
    return student_z, teacher_z, student_w, teacher_w


def _weight_norm_pair(dtype=torch.float64):
    """DINOHead's prototype parameters (v, g) and the W = g v / ||v|| they stand for."""
    v = torch.randn(K, P, dtype=dtype).requires_grad_()
    g = (torch.rand(K, dtype=dtype) * 1.5 + 0.5).requires_grad_()
    return v, g


@pytest.mark.parametrize("form", ["W", "v_g"])
@pytest.mark.parametrize("vmf", [False, True])
@pytest.mark.parametrize("centering", ["logit", "prob", "sinkhorn"])
def test_dino_loss_matches_composition_of_references(seed, vmf, centering, form):
    sz, tz, sw, tw = _heads()
    if form == "v_g":
        v, g = _weight_norm_pair()
        student, params = (v, g), (v, g)
        sw_eff = F.normalize(v, dim=1) * g[:, None]
    else:
        student, params, sw_eff = sw, (sw,), sw
    loss_fn = DINOLoss(K, P, vmf=vmf, student_temp=0.1, centering=centering, backend="torch")
    center_before = loss_fn.center.center.clone()
    loss, metrics = loss_fn(sz, tz, student, tw, teacher_temp=0.05, n_global=T)

    logits = vmf_logits(sz, sw_eff, 0.1) if vmf else sz @ sw_eff.T / 0.1
    dots = tz @ tw.T
    probs, stat = teacher_distribution_reference(dots, 0.05, centering, center_before if centering != "sinkhorn"
                                                 else None, tw.norm(dim=1) if vmf else None, P)
    want = loop_cross_entropy(logits.view(S, B, K), probs.view(T, B, K))
    torch.testing.assert_close(loss, want)
    assert set(metrics) >= {"loss", "teacher_entropy", "student_entropy"}
    # device tensors (no host sync in the loss); the trainer's to_floats makes them floats in one sync
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    floats = to_floats(metrics)
    assert all(isinstance(v, float) for v in floats.values())
    assert floats["loss"] == pytest.approx(want.item())
    want_entropy = -torch.special.xlogy(probs, probs).sum(-1).mean().item()
    assert floats["teacher_entropy"] == pytest.approx(want_entropy, rel=1e-4, abs=1e-6)
    q = torch.softmax(logits, dim=1)
    assert floats["student_entropy"] == pytest.approx(-(q * q.log()).sum(-1).mean().item(), rel=1e-4)
    assert floats["teacher_used_prototypes"] == used_prototypes(probs)
    assert floats["kappa_max"] == pytest.approx(sw_eff.norm(dim=1).max().item() / 0.1, rel=1e-6)
    assert floats["kappa_min"] == pytest.approx(sw_eff.norm(dim=1).min().item() / 0.1, rel=1e-6)
    if stat is not None:  # the center moved by the EMA of this batch's statistic
        torch.testing.assert_close(loss_fn.center.center.double(), 0.9 * center_before.double() + 0.1 * stat)
    got = torch.autograd.grad(loss, (sz,) + params)
    expected = torch.autograd.grad(want, (sz,) + params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_dino_special_case_unit_prototypes(seed):
    # With unit-norm prototypes the vMF normaliser is the same for every k: vMF == plain DINO exactly.
    sz, tz, _, _ = _heads()
    w = F.normalize(torch.randn(K, P, dtype=torch.float64), dim=1)
    torch.testing.assert_close(prototype_logits(sz, w, 0.1, vmf=True), prototype_logits(sz, w, 0.1, vmf=False))
    losses = [DINOLoss(K, P, vmf=v, centering="logit", backend="torch")(sz, tz, w, w, 0.04, T)[0] for v in (False, True)]
    torch.testing.assert_close(losses[0], losses[1])
    # ... and with non-unit norms they differ (the test can fail).
    w2 = w * torch.linspace(0.5, 2, K, dtype=torch.float64)[:, None]
    losses = [DINOLoss(K, P, vmf=v, centering="logit", backend="torch")(sz, tz, w2, w2, 0.04, T)[0] for v in (False, True)]
    assert abs(losses[0].item() - losses[1].item()) > 1e-3


@pytest.mark.parametrize("form", ["W", "v_g"])
def test_dino_loss_gradient_matches_finite_differences(seed, form):
    """Directional derivatives by central differences (float64), independent of any autograd formula.
    (torch.autograd.gradcheck does not apply: the fused op computes its gradients once, in forward, and
    its backward runs once, as Liger's fused linear cross-entropy.)"""
    sz, tz, sw, tw = _heads()
    student = _weight_norm_pair() if form == "v_g" else sw
    leaves = (sz,) + (student if isinstance(student, tuple) else (student,))
    loss_fn = DINOLoss(K, P, vmf=True, centering="prob", backend="torch")
    loss_fn.center.momentum = 1.0  # the center stays put: repeated calls are the same function

    def f(xs):
        return loss_fn(xs[0], tz, tuple(xs[1:]) if form == "v_g" else xs[1], tw, 0.05, T)[0]

    grads = torch.autograd.grad(f(leaves), leaves)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        d = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in leaves]
        h = 1e-6
        with torch.no_grad():
            plus = f([x + h * di for x, di in zip(leaves, d)])
            minus = f([x - h * di for x, di in zip(leaves, d)])
        numeric = (plus - minus) / (2 * h)
        analytic = sum((g * di).sum() for g, di in zip(grads, d))
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_global=5), "n_global"),
    (dict(student_z=torch.randn(S * B, P + 1)), "student_z"),
    (dict(teacher_weight=torch.randn(K + 1, P)), "teacher_weight"),
    (dict(student_weight=(torch.randn(K, P), torch.ones(K + 1))), "g must have shape"),
    (dict(student_z=torch.randn(S * B + 1, P)), "student_z"),
])
def test_dino_loss_shape_errors(seed, kwargs, name):
    sz, tz, sw, tw = _heads(torch.float32)
    args = dict(student_z=sz, teacher_z=tz, student_weight=sw, teacher_weight=tw, teacher_temp=0.04, n_global=T)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        DINOLoss(K, P, backend="torch")(**args)


def test_dino_loss_cpp_backend_matches_float64(seed):
    """The trainer's path on CPU: DINOLoss with (v, g) on the cpp kernels, fp32, against float64."""
    sz, tz, _, tw = _heads()
    v, g = _weight_norm_pair()
    ref = DINOLoss(K, P, vmf=True, centering="prob", backend="torch")
    loss64, _ = ref(sz, tz, (v, g), tw, 0.05, T)
    grads64 = torch.autograd.grad(loss64, (sz, v, g))
    leaves = [x.detach().float().requires_grad_() for x in (sz, v, g)]
    loss32, m = DINOLoss(K, P, vmf=True, centering="prob", backend="cpp")(leaves[0], tz.float(), tuple(leaves[1:]),
                                                                         tw.float(), 0.05, T)
    assert loss32.dtype == torch.float32 and m["loss"].dtype == torch.float32
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(loss32, leaves), grads64):
        assert (a.double() - b).abs().max().item() <= 1e-5 * b.abs().max().item()
