"""Shared pytest set-up.

Without a GPU, Triton kernels run through the interpreter; the variable must be set before triton is
first imported, which is why it is set here rather than in a fixture.
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed():
    """Seed torch's generators so a test sees the same random inputs every run."""
    torch.manual_seed(0)
    return 0


requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")


def require_ffcv():
    """Skip the calling test module when FFCV is not importable, unless DINOVMF_REQUIRE_FFCV=1 (set by
    .ci/run, where `make` installs FFCV): there a missing FFCV is a failure, not a silent skip."""
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        if os.environ.get("DINOVMF_REQUIRE_FFCV") == "1":
            pytest.fail(f"DINOVMF_REQUIRE_FFCV=1 but FFCV does not import: {e}", pytrace=False)
        pytest.skip("FFCV is not installed", allow_module_level=True)
