"""The C++ CPU backend (dinovmf._C) against float64 oracles: every layout, dtype, centering mode, K path."""
import pytest
import torch

from dinovmf._ext import dino_cross_entropy_cpp, teacher_distribution_cpp
from dinovmf.kernels import testing as kt

LAYOUTS = [(12, 2), (2, 2), (4, 1)]  # DINO multi-crop, two globals only, one teacher view


@pytest.mark.parametrize("S,T", LAYOUTS)
@pytest.mark.parametrize("K", [333, 4099])  # 333 < one tile; 4099 = two full tiles + a 3-wide tail
def test_cross_entropy_fp32(S, T, K):
    kt.check_cross_entropy(dino_cross_entropy_cpp, S, T, 3, K, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,T", LAYOUTS)
def test_cross_entropy_low_precision(S, T, dtype):
    kt.check_cross_entropy(dino_cross_entropy_cpp, S, T, 2, 4099, dtype)


def test_cross_entropy_issue_width():
    kt.check_cross_entropy(dino_cross_entropy_cpp, 12, 2, 2, 65536, torch.float32)


def test_cross_entropy_noncontiguous_and_half_teacher():
    logits, probs = kt.cross_entropy_inputs(4, 2, 3, 333, torch.float32)
    logits_nc = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    probs16 = probs.half()
    l64 = logits.double().requires_grad_()
    kt.dino_cross_entropy_loop64(l64, probs16).backward()
    x = logits_nc.clone().requires_grad_()
    assert not x.is_contiguous()
    out = dino_cross_entropy_cpp(x, probs16)
    out.backward()
    assert abs(out.item() - kt.dino_cross_entropy_loop64(logits, probs16).item()) < 1e-5 * abs(out.item())
    assert kt.max_abs_err(x.grad, l64.grad) < 1e-5 * l64.grad.abs().max().item()


@pytest.mark.parametrize("mode", ["logit", "prob", "none", "sinkhorn"])
@pytest.mark.parametrize("K", [333, 4099])
def test_teacher_modes_vmf(mode, K):
    kt.check_teacher(teacher_distribution_cpp, 6, K, torch.float32, mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["logit", "prob", "sinkhorn"])
def test_teacher_low_precision(dtype, mode):
    kt.check_teacher(teacher_distribution_cpp, 4, 4099, dtype, mode)


@pytest.mark.parametrize("mode", ["logit", "none"])
def test_teacher_plain_dino_and_small_p(mode):
    kt.check_teacher(teacher_distribution_cpp, 4, 333, torch.float32, mode, vmf=False)
    kt.check_teacher(teacher_distribution_cpp, 4, 333, torch.float32, mode, p=16)  # bias from dinovmf.vmf


@pytest.mark.parametrize("K", [65536, 131072])
def test_teacher_wide(K):
    kt.check_teacher(teacher_distribution_cpp, 2, K, torch.float32, "prob")


@pytest.mark.parametrize("p", [32, 256, 1024])
def test_column_bias_matches_float64(p):
    """logit mode with dots = 0 and center = 0 has stat = temp * bias: the in-op Debye bias itself."""
    from dinovmf.vmf import vmf_column_bias

    wn = torch.logspace(-2, 2, 200)  # kappa from 0.2 to 2000 at temp 0.05
    _, stat = teacher_distribution_cpp(torch.zeros(1, 200), kt.TEMP, "logit", torch.zeros(200), wn, p)
    ref = vmf_column_bias(wn.double(), kt.TEMP, p)
    err = (stat.double() / kt.TEMP - ref).abs() / (1 + ref.abs())
    assert err.max().item() < 2e-6  # fp32 output of a double computation: a few ulps of (1 + |bias|)


def test_baseline_sse2_path_matches_float64():
    """The extension carries an AVX2 and an SSE2 build of its loops; force the SSE2 one in a subprocess."""
    import os
    import subprocess
    import sys

    code = ("import torch; from dinovmf._ext import dino_cross_entropy_cpp as ce, teacher_distribution_cpp as td; "
            "from dinovmf.kernels import testing as kt; "
            "kt.check_cross_entropy(ce, 4, 2, 2, 4099, torch.float32); "
            "kt.check_cross_entropy(ce, 4, 2, 2, 333, torch.bfloat16); "
            "[kt.check_teacher(td, 3, 4099, torch.float32, m) for m in ('logit', 'prob', 'sinkhorn')]")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DINOVMF_CPU_BASELINE": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
