"""Backend registry and dispatch: availability, "auto", clear errors, and the public entry points."""
import os

import pytest
import torch

from dinovmf import backends
from dinovmf.loss import dino_cross_entropy
from dinovmf.centering import teacher_distribution
from dinovmf.kernels import testing as kt


def test_torch_and_cpp_available_on_cpu():
    avail = backends.available_backends("cpu")
    assert avail[0] == "torch" and "cpp" in avail and "cuda" not in avail


def test_auto_prefers_cpp_on_cpu():
    assert backends.resolve_backend("auto", "cpu") == "cpp"


def test_triton_on_cpu_follows_the_interpreter_flag():
    # conftest turns the interpreter on when there is no GPU
    expected = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    assert ("triton" in backends.available_backends("cpu")) == expected


def test_unknown_backend_is_rejected_with_choices():
    with pytest.raises(backends.BackendUnavailable, match="unknown backend 'tpu'.*auto"):
        backends.resolve_backend("tpu", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_backend_without_gpu_says_why():
    with pytest.raises(backends.BackendUnavailable, match="needs a CUDA device.*available on cpu"):
        backends.resolve_backend("cuda", "cpu")


def test_cpp_rejects_cuda_device_tensors_by_name():
    with pytest.raises(backends.BackendUnavailable, match="CPU tensors only"):
        backends.resolve_backend("cpp", "cuda")


def test_impls_have_the_contract_signatures():
    for name in backends.available_backends("cpu"):
        assert callable(backends.cross_entropy_impl(name)) and callable(backends.teacher_impl(name))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_public_entry_points_dispatch(backend):
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} not available here")
    logits, probs = kt.cross_entropy_inputs(4, 2, 2, 100, torch.float32)
    ref = kt.dino_cross_entropy_loop64(logits, probs).item()
    assert abs(dino_cross_entropy(logits, probs, backend=backend).item() - ref) < 1e-5 * abs(ref)
    dots, center, wn = kt.teacher_inputs(3, 100, torch.float32, "logit")
    p_ref, s_ref = teacher_distribution(dots, kt.TEMP, "logit", center, wn, 256, backend="torch")
    p_k, s_k = teacher_distribution(dots, kt.TEMP, "logit", center, wn, 256, backend=backend)
    assert torch.allclose(p_k, p_ref, rtol=1e-4, atol=1e-7) and torch.allclose(s_k, s_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_bad_inputs_raise_value_errors_naming_the_argument(backend):
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} not available here")
    ce, teacher = backends.cross_entropy_impl(backend), backends.teacher_impl(backend)
    x = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="student_logits"):
        ce(torch.zeros(4, 8), x)
    with pytest.raises(ValueError, match="teacher_probs"):
        ce(x, torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="no DINO pairs"):
        ce(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="student_logits must be a floating-point"):
        ce(x.long(), x)
    d = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="mode"):
        teacher(d, 0.1, "softmax")
    with pytest.raises(ValueError, match="temp"):
        teacher(d, 0.0, "none")
    with pytest.raises(ValueError, match="center"):
        teacher(d, 0.1, "logit", None)
    with pytest.raises(ValueError, match="center"):
        teacher(d, 0.1, "prob", torch.ones(7))
    with pytest.raises(ValueError, match="weight_norm"):
        teacher(d, 0.1, "none", None, torch.ones(5), 256)
    with pytest.raises(ValueError, match="p "):
        teacher(d, 0.1, "none", None, torch.ones(8), None)
    with pytest.raises(ValueError, match="dots"):
        teacher(torch.zeros(8), 0.1, "none")


def test_extension_loader_rejects_unknown_names():
    from dinovmf._ext import load_extension

    with pytest.raises(ValueError, match="backend"):
        load_extension("rocm")
