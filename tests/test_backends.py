"""Backend registry and dispatch: availability, "auto", clear errors (the retired CUDA twin names triton),
the contract signatures of the row kernels, and the public entry points on each backend."""
import inspect
import os

import pytest
import torch

from dinovmf import backends
from dinovmf.centering import teacher_distribution
import _kernel_checks as kt
from dinovmf.loss import dino_cross_entropy

CE_ROWS_PARAMS = ["logits", "col_scale", "bias", "teacher_probs", "row_index", "B", "T", "same_view", "row_weight",
                  "grad_scale", "grad_out", "col_grad_sum"]
TEACHER_ROWS_PARAMS = ["dots", "temp", "mode", "center", "col_scale", "bias", "out"]


def test_torch_and_cpp_available_on_cpu():
    avail = backends.available_backends("cpu")
    assert avail[0] == "torch" and "cpp" in avail and "cuda" not in avail


def test_auto_prefers_cpp_on_cpu():
    assert backends.resolve_backend("auto", "cpu") == "cpp"


def test_triton_on_cpu_needs_the_interpreter_and_the_entry_points():
    avail = "triton" in backends.available_backends("cpu")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        if not torch.cuda.is_available():
            assert not avail
        return
    from dinovmf.kernels import triton_ops  # conftest turns the interpreter on when there is no GPU
    has_entry_points = hasattr(triton_ops, "ce_rows_triton") and hasattr(triton_ops, "teacher_rows_triton")
    assert avail == has_entry_points
    if not avail:
        with pytest.raises(backends.BackendUnavailable, match="has no ce_rows_triton"):
            backends.resolve_backend("triton", "cpu")


def test_unknown_backend_is_rejected_with_choices():
    with pytest.raises(backends.BackendUnavailable, match="unknown backend 'tpu'.*auto"):
        backends.resolve_backend("tpu", "cpu")


def test_cpp_rejects_cuda_device_tensors_by_name():
    with pytest.raises(backends.BackendUnavailable, match="CPU tensors only"):
        backends.resolve_backend("cpp", "cuda")


def _contract_params(fn):
    """The parameters a caller may pass positionally, with their defaults (keyword-only test hooks such as
    Triton's `plan=` are not part of the contract)."""
    return [(n, p.default) for n, p in inspect.signature(fn).parameters.items() if p.kind != p.KEYWORD_ONLY]


def test_impls_have_the_contract_signatures():
    empty = inspect.Parameter.empty
    teacher_contract = [(n, None if n in ("center", "col_scale", "bias", "out") else empty) for n in TEACHER_ROWS_PARAMS]
    for name in backends.available_backends("cpu"):
        ce, teacher = backends.ce_rows_impl(name), backends.teacher_rows_impl(name)
        assert _contract_params(ce) == [(n, empty) for n in CE_ROWS_PARAMS], name
        assert _contract_params(teacher) == teacher_contract, name


def test_every_ce_rows_takes_the_visit_order_hint():
    """`visit_inner` (keyword) orders the visits, never the results: every backend gives the same statistics
    and gradient for 1 and S, and names it when it does not divide the rows."""
    S, T, B, K = 3, 2, 2, 40
    logits, probs = kt.cross_entropy_inputs(S, T, B, K, torch.float32)
    x, P, rows = logits.view(S * B, K), probs.view(T * B, K), torch.arange(S * B)
    for name in backends.available_backends("cpu"):
        ce = backends.ce_rows_impl(name)
        grads = [torch.empty_like(x) for _ in range(2)]
        stats = [ce(x, None, None, P, rows, B, T, False, None, 0.5, grads[i], None, visit_inner=v)
                 for i, v in enumerate((1, S))]
        assert torch.equal(stats[0], stats[1]) and torch.equal(grads[0], grads[1]), name
        with pytest.raises(ValueError, match="visit_inner"):
            ce(x, None, None, P, rows, B, T, False, None, 0.5, None, None, visit_inner=4)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_public_entry_points_dispatch(backend):
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} not available here")
    logits, probs = kt.cross_entropy_inputs(4, 2, 2, 100, torch.float32)
    ref = kt.dino_cross_entropy_loop64(logits, probs).item()
    assert abs(dino_cross_entropy(logits, probs, backend=backend).item() - ref) < 1e-5 * abs(ref)
    dots, center, wn = kt.teacher_inputs(3, 100, torch.float32, "logit")
    p_ref, s_ref = teacher_distribution(dots.double(), kt.TEMP, "logit", center.double(), wn.double(), 256,
                                        backend="torch")
    p_k, s_k = teacher_distribution(dots, kt.TEMP, "logit", center, wn, 256, backend=backend)
    assert torch.allclose(p_k.double(), p_ref, rtol=1e-4, atol=1e-7)
    assert torch.allclose(s_k.double(), s_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_bad_inputs_raise_value_errors_naming_the_argument(backend):
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"{backend} not available here")
    x = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="student_logits"):
        dino_cross_entropy(torch.zeros(4, 8), x, backend=backend)
    with pytest.raises(ValueError, match="teacher_probs"):
        dino_cross_entropy(x, torch.zeros(2, 3, 8), backend=backend)
    with pytest.raises(ValueError, match="no DINO pairs"):
        dino_cross_entropy(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), backend=backend)
    with pytest.raises(ValueError, match="student_logits must be a floating-point"):
        dino_cross_entropy(x.long(), x, backend=backend)
    ce, teacher = backends.ce_rows_impl(backend), backends.teacher_rows_impl(backend)
    logits, probs, rows = torch.zeros(3, 8), torch.zeros(4, 8), torch.arange(3)
    ok = dict(logits=logits, col_scale=None, bias=None, teacher_probs=probs, row_index=rows, B=2, T=2,
              same_view=False, row_weight=None, grad_scale=1.0, grad_out=None, col_grad_sum=None)
    for bad, match in [(dict(logits=torch.zeros(8)), "logits"), (dict(col_scale=torch.ones(7)), "col_scale"),
                       (dict(bias=torch.ones(3, 8)), "bias"), (dict(teacher_probs=torch.zeros(4, 9)), "teacher_probs"),
                       (dict(row_index=rows.int()), "row_index"), (dict(T=3), "T\\*B"),
                       (dict(row_weight=torch.ones(2)), "row_weight"), (dict(grad_out=torch.zeros(3, 9)), "grad_out"),
                       (dict(col_grad_sum=torch.zeros(8, dtype=torch.float64)), "col_grad_sum")]:
        with pytest.raises(ValueError, match=match):
            ce(**{**ok, **bad})
    d = torch.zeros(3, 8)
    for args, match in [((d, 0.1, "softmax"), "mode"), ((d, 0.0, "none"), "temp"), ((d, 0.1, "logit", None), "center"),
                        ((d, 0.1, "prob", torch.ones(7)), "center"),
                        ((d, 0.1, "none", None, torch.ones(5)), "col_scale"),
                        ((d, 0.1, "none", None, None, torch.ones(5)), "bias"),
                        ((d, 0.1, "none", None, None, None, torch.zeros(3, 9)), "out"),
                        ((torch.zeros(8), 0.1, "none"), "dots")]:
        with pytest.raises(ValueError, match=match):
            teacher(*args)
    with pytest.raises(ValueError, match="p "):
        teacher_distribution(d, 0.1, "none", None, torch.ones(8), None, backend=backend)


def test_missing_extension_says_how_to_build(monkeypatch):
    from dinovmf import _ext

    monkeypatch.setattr(_ext, "EXTENSION", "dinovmf._C_not_built")
    _ext.load_extension.cache_clear()
    try:
        with pytest.raises(_ext.ExtensionUnavailable, match="make install"):
            _ext.load_extension()
    finally:
        _ext.load_extension.cache_clear()
