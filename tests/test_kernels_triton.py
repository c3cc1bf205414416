"""The Triton backend against float64 oracles. On CPU it runs under TRITON_INTERPRET=1 (set by conftest),
which executes every program in numpy: B is 1-3 and K=65536 appears once per op, each case chosen to
hit one code path (single partial tile, several tiles + tail, full issue width; every layout, dtype
and centering mode; in-kernel Debye bias, precomputed bias, no bias)."""
import os

import pytest
import torch

from dinovmf.kernels import testing as kt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def ops():
    from dinovmf.kernels import triton_ops
    return triton_ops


@pytest.mark.parametrize("S,T,K", [(12, 2, 333), (2, 2, 4099), (4, 1, 4099)])
def test_cross_entropy_layouts(ops, S, T, K):
    kt.check_cross_entropy(ops.dino_cross_entropy_triton, S, T, 2, K, torch.float32, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision(ops, dtype):
    kt.check_cross_entropy(ops.dino_cross_entropy_triton, 4, 2, 2, 4099, dtype, DEVICE)


def test_cross_entropy_issue_width(ops):
    kt.check_cross_entropy(ops.dino_cross_entropy_triton, 12, 2, 1, 65536, torch.float32, DEVICE)


@pytest.mark.parametrize("mode", ["logit", "prob", "none", "sinkhorn"])
def test_teacher_modes_vmf(ops, mode):
    kt.check_teacher(ops.teacher_distribution_triton, 3, 4099, torch.float32, mode, device=DEVICE)


@pytest.mark.parametrize("dtype,mode", [(torch.bfloat16, "logit"), (torch.float16, "prob")])
def test_teacher_low_precision(ops, dtype, mode):
    kt.check_teacher(ops.teacher_distribution_triton, 3, 333, dtype, mode, device=DEVICE)


def test_teacher_plain_dino_and_small_p(ops):
    kt.check_teacher(ops.teacher_distribution_triton, 3, 333, torch.float32, "logit", vmf=False, device=DEVICE)
    kt.check_teacher(ops.teacher_distribution_triton, 3, 333, torch.float32, "sinkhorn", p=16, device=DEVICE)


def test_teacher_issue_width(ops):
    kt.check_teacher(ops.teacher_distribution_triton, 2, 65536, torch.float32, "prob", device=DEVICE)


@pytest.mark.parametrize("p", [32, 256, 1024])
def test_in_kernel_column_bias_matches_float64(p):
    """The fp32 Debye device function against the float64 vmf module, kappa from 0.2 to 2000."""
    from dinovmf.kernels.vmf_bias import vmf_column_bias_triton
    from dinovmf.vmf import vmf_column_bias

    wn = torch.logspace(-2, 2, 300, device=DEVICE)
    ref = vmf_column_bias(wn.double(), kt.TEMP, p)
    err = (vmf_column_bias_triton(wn, kt.TEMP, p).double() - ref).abs() / (1 + ref.abs())
    # Measured <= 4e-7: fp32 rounding of terms of size ~(1 + |bias|); 2e-6 is ~30 fp32 ulps.
    assert err.max().item() < 2e-6


def test_in_kernel_bias_rejects_small_p():
    from dinovmf.kernels.vmf_bias import vmf_column_bias_triton

    with pytest.raises(ValueError, match="p must be >= 32"):
        vmf_column_bias_triton(torch.ones(4), kt.TEMP, 16)
