"""The iBOT(-vMF) patch loss (dinovmf.ibot) against a float64 plain-loop oracle.

The oracle computes the vMF normaliser with scipy (not dinovmf.vmf), loops over images and masked tokens,
and applies iBOT's weighting (per-image mean over masked tokens, then mean over images with a mask).
"""
import math

import numpy as np
import pytest
import torch
from scipy.special import ive

from dinovmf.backends import available_backends
from dinovmf.ibot import IBOTPatchLoss, masked_token_weights

N_IMAGES, N_PATCHES, P, K = 5, 6, 8, 11


def log_vmf_normalizer_scipy(kappa: np.ndarray, p: int) -> np.ndarray:
    nu = p / 2 - 1
    return nu * np.log(kappa) - 0.5 * p * math.log(2 * math.pi) - (np.log(ive(nu, kappa)) + kappa)


def column_bias(weight: np.ndarray, temp: float, vmf: bool) -> np.ndarray:
    if not vmf:
        return np.zeros(weight.shape[0])
    p = weight.shape[1]
    norms = np.linalg.norm(weight, axis=1)
    return log_vmf_normalizer_scipy(norms / temp, p) - log_vmf_normalizer_scipy(np.array([1 / temp]), p)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def oracle(student_z, teacher_z, masks, student_w, teacher_w, student_temp, teacher_temp, mode, center, vmf):
    """(loss, center statistic over the masked tokens) by a plain loop, float64."""
    s_bias = column_bias(student_w, student_temp, vmf)
    t_bias = column_bias(teacher_w, teacher_temp, vmf)
    total, n_masked_images, stats = 0.0, 0, []
    for b in range(masks.shape[0]):
        positions = [j for j in range(masks.shape[1]) if masks[b, j]]
        if not positions:
            continue
        n_masked_images += 1
        per_image = 0.0
        for j in positions:
            logits = student_z[b, j] @ student_w.T / student_temp + s_bias
            raw = teacher_z[b, j] @ teacher_w.T + teacher_temp * t_bias
            if mode == "prob":
                sharp = softmax(raw / teacher_temp)
                stats.append(sharp)
                target = sharp / center / (sharp / center).sum()
            else:  # logit
                stats.append(raw)
                target = softmax((raw - center) / teacher_temp)
            log_q = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
            per_image += -(target * log_q).sum()
        total += per_image / len(positions)
    return total / n_masked_images, np.mean(stats, axis=0)


def make_inputs(seed: int, dtype=torch.float64, n_images=N_IMAGES, n_patches=N_PATCHES, p=P, k=K):
    g = torch.Generator().manual_seed(seed)
    student_z = torch.nn.functional.normalize(torch.randn(n_images, n_patches, p, generator=g, dtype=dtype), dim=-1)
    teacher_z = torch.nn.functional.normalize(torch.randn(n_images, n_patches, p, generator=g, dtype=dtype), dim=-1)
    # Free prototype norms (DINO-vMF) in [0.5, 2]; the teacher's differ from the student's.
    student_w = torch.randn(k, p, generator=g, dtype=dtype)
    student_w = student_w / student_w.norm(dim=1, keepdim=True) * (0.5 + 1.5 * torch.rand(k, 1, generator=g, dtype=dtype))
    teacher_w = student_w + 0.1 * torch.randn(k, p, generator=g, dtype=dtype)
    masks = torch.rand(n_images, n_patches, generator=g) < 0.4
    masks[0] = False  # an image without a mask takes no part
    masks[1] = False
    masks[1, 2] = True  # an image with a single masked token
    masks[2, :] = True  # a fully masked image weighs as much as the single-token one
    return student_z, teacher_z, masks, student_w, teacher_w


def numpy_args(*tensors):
    return [t.detach().double().numpy() for t in tensors]


@pytest.mark.parametrize("vmf, mode", [(True, "prob"), (False, "logit")])
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_loss_and_center_update_match_the_loop_oracle(vmf, mode, backend):
    student_temp, teacher_temps, momentum = 0.1, (0.04, 0.06), 0.8
    loss_fn = IBOTPatchLoss(K, p=P, vmf=vmf, student_temp=student_temp, centering=mode,
                            center_momentum=momentum, backend=backend)
    center = np.full(K, 1.0 / K) if mode == "prob" else np.zeros(K)
    # The kernels compute in fp32 (float64 inputs are the reference backend's); the oracle sees the same values.
    dtype = torch.float64 if backend == "torch" else torch.float32
    for step, teacher_temp in enumerate(teacher_temps):  # step 2 uses the center step 1 updated
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in make_inputs(seed=step)]
        loss, metrics = loss_fn(*inputs, teacher_temp=teacher_temp)
        expected, stat = oracle(*numpy_args(*inputs), student_temp, teacher_temp, mode, center, vmf)
        assert loss.item() == pytest.approx(expected, rel=1e-6 if backend == "torch" else 1e-5)
        assert metrics["loss_patch"].item() == pytest.approx(expected, rel=1e-5)
        center = momentum * center + (1 - momentum) * stat
        np.testing.assert_allclose(loss_fn.center.center.double().numpy(), center, rtol=1e-5, atol=1e-7)
    assert metrics["masked_tokens"].item() == float(inputs[2].sum())
    assert metrics["masked_images"].item() == float((inputs[2].sum(dim=1) > 0).sum())
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("form", ["W", "v_g"])
def test_gradients_match_finite_differences_float64(form):
    """Directional derivatives by central differences against the op's gradients (float64, torch kernels).
    momentum 1: the center stays put, so repeated forward calls are the same function."""
    loss_fn = IBOTPatchLoss(K, p=P, vmf=True, centering="prob", center_momentum=1.0, backend="torch")
    student_z, teacher_z, masks, student_w, teacher_w = make_inputs(seed=3)
    if form == "v_g":
        leaves = (student_z, student_w, student_w.norm(dim=1))  # v = w, g = ||w||: the same prototypes
    else:
        leaves = (student_z, student_w)
    leaves = tuple(x.clone().requires_grad_() for x in leaves)

    def f(xs):
        weight = (xs[1], xs[2]) if form == "v_g" else xs[1]
        return loss_fn(xs[0], teacher_z, masks, weight, teacher_w, teacher_temp=0.05)[0]

    grads = torch.autograd.grad(f(leaves), leaves)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in leaves]
        with torch.no_grad():
            numeric = (f([x + 1e-6 * di for x, di in zip(leaves, d)])
                       - f([x - 1e-6 * di for x, di in zip(leaves, d)])) / 2e-6
        analytic = sum((g * di).sum() for g, di in zip(grads, d))
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


def test_only_masked_positions_matter_and_the_teacher_gets_no_gradient():
    loss_fn = IBOTPatchLoss(K, p=P, vmf=True, centering="prob", center_momentum=1.0, backend="torch")
    student_z, teacher_z, masks, student_w, teacher_w = make_inputs(seed=4)
    student_w.requires_grad_(True)
    teacher_z.requires_grad_(True)
    teacher_w.requires_grad_(True)
    base, _ = loss_fn(student_z, teacher_z, masks, student_w, teacher_w, teacher_temp=0.05)
    base.backward()
    assert teacher_z.grad is None and teacher_w.grad is None
    assert student_w.grad is not None and torch.count_nonzero(student_w.grad) > 0
    moved_s, moved_t = student_z.clone(), teacher_z.detach().clone()
    moved_s[~masks] = torch.randn_like(moved_s[~masks])
    moved_t[~masks] = torch.randn_like(moved_t[~masks])
    same, _ = loss_fn(moved_s, moved_t, masks, student_w, teacher_w.detach(), teacher_temp=0.05)
    assert same.item() == pytest.approx(base.item(), rel=1e-12)
    moved_s[masks] = torch.randn_like(moved_s[masks])
    changed, _ = loss_fn(moved_s, moved_t, masks, student_w, teacher_w.detach(), teacher_temp=0.05)
    assert changed.item() != pytest.approx(base.item(), rel=1e-6)


def test_masked_token_weights_give_each_masked_image_equal_weight():
    masks = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    w = masked_token_weights(masks)
    expected = torch.tensor([1 / 3] + [1 / 12] * 4 + [1 / 6] * 2)
    torch.testing.assert_close(w, expected)
    assert masked_token_weights(torch.zeros(3, 4, dtype=torch.bool)).numel() == 0


def test_no_masked_token_gives_a_zero_loss_that_still_backpropagates():
    loss_fn = IBOTPatchLoss(K, p=P, vmf=True, centering="prob", backend="torch")
    student_z, teacher_z, _, student_w, teacher_w = make_inputs(seed=5)
    student_z.requires_grad_(True)
    student_w.requires_grad_(True)
    center_before = loss_fn.center.center.clone()
    loss, metrics = loss_fn(student_z, teacher_z, torch.zeros(N_IMAGES, N_PATCHES, dtype=torch.bool),
                            student_w, teacher_w, teacher_temp=0.05)
    loss.backward()
    assert loss.item() == 0.0 and metrics["masked_tokens"].item() == 0.0
    assert torch.count_nonzero(student_z.grad) == 0 and student_w.grad is not None
    assert torch.equal(loss_fn.center.center, center_before)


def test_float32_inputs_match_float64():
    loss_fn64 = IBOTPatchLoss(K, p=P, vmf=True, centering="prob", backend="torch")
    loss_fn32 = IBOTPatchLoss(K, p=P, vmf=True, centering="prob", backend="torch")
    inputs = make_inputs(seed=6)
    l64, _ = loss_fn64(*inputs, teacher_temp=0.05)
    l32, _ = loss_fn32(*[x.float() if x.is_floating_point() else x for x in inputs], teacher_temp=0.05)
    assert l32.dtype == torch.float32
    assert l32.item() == pytest.approx(l64.item(), rel=1e-5)


@pytest.mark.parametrize("bad, name", [
    (lambda a: {**a, "student_patch_z": a["student_patch_z"][..., :3]}, "student_patch_z"),
    (lambda a: {**a, "teacher_patch_z": a["teacher_patch_z"][:2]}, "teacher_patch_z"),
    (lambda a: {**a, "masks": a["masks"].long()}, "masks"),
    (lambda a: {**a, "masks": a["masks"][:, :2]}, "masks"),
    (lambda a: {**a, "student_weight": a["student_weight"][:3]}, "student_weight"),
    (lambda a: {**a, "teacher_weight": a["teacher_weight"][:, :3]}, "teacher_weight"),
])
def test_bad_inputs_raise_naming_the_argument(bad, name):
    student_z, teacher_z, masks, student_w, teacher_w = make_inputs(seed=7)
    args = {"student_patch_z": student_z, "teacher_patch_z": teacher_z, "masks": masks,
            "student_weight": student_w, "teacher_weight": teacher_w}
    with pytest.raises(ValueError, match=name):
        IBOTPatchLoss(K, p=P)(**bad(args), teacher_temp=0.05)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="out_dim"):
        IBOTPatchLoss(0, p=P)
    with pytest.raises(ValueError, match="student_temp"):
        IBOTPatchLoss(K, p=P, student_temp=0.0)
    with pytest.raises(ValueError, match="mode"):
        IBOTPatchLoss(K, p=P, centering="bogus")
