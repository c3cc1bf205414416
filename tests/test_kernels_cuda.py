"""The CUDA backend (dinovmf._C_cuda) against float64 oracles; skipped without a GPU and the extension."""
import pytest
import torch

from conftest import requires_cuda
from dinovmf.kernels import testing as kt

pytestmark = requires_cuda
LAYOUTS = [(12, 2), (2, 2), (4, 1)]


@pytest.fixture(scope="module")
def ext():
    from dinovmf import _ext

    try:
        _ext.load_extension("cuda")
    except _ext.ExtensionUnavailable as e:
        pytest.skip(f"CUDA extension not built: {e}")
    return _ext


@pytest.mark.parametrize("S,T", LAYOUTS)
@pytest.mark.parametrize("K", [333, 4099, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy(ext, S, T, K, dtype):
    kt.check_cross_entropy(ext.dino_cross_entropy_cuda, S, T, 4, K, dtype, "cuda")


@pytest.mark.parametrize("mode", ["logit", "prob", "none", "sinkhorn"])
@pytest.mark.parametrize("K", [333, 4099, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_teacher(ext, mode, K, dtype):
    kt.check_teacher(ext.teacher_distribution_cuda, 8, K, dtype, mode, device="cuda")


@pytest.mark.parametrize("mode", ["logit", "sinkhorn"])
def test_teacher_plain_dino_and_small_p(ext, mode):
    kt.check_teacher(ext.teacher_distribution_cuda, 8, 4099, torch.float32, mode, vmf=False, device="cuda")
    kt.check_teacher(ext.teacher_distribution_cuda, 8, 4099, torch.float32, mode, p=16, device="cuda")


@pytest.mark.parametrize("p", [32, 256, 1024])
def test_in_kernel_column_bias_matches_float64(ext, p):
    """logit mode with dots = 0 and center = 0 has stat = temp * bias: the fp32 Debye bias itself."""
    from dinovmf.vmf import vmf_column_bias

    wn = torch.logspace(-2, 2, 300, device="cuda")
    _, stat = ext.teacher_distribution_cuda(torch.zeros(1, 300, device="cuda"), kt.TEMP, "logit",
                                            torch.zeros(300, device="cuda"), wn, p)
    ref = vmf_column_bias(wn.double(), kt.TEMP, p)
    assert ((stat.double() / kt.TEMP - ref).abs() / (1 + ref.abs())).max().item() < 2e-6
