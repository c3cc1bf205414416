"""The Triton backend's two entry points, as registered in `dinovmf.backends` (one module per backend)."""
from dinovmf.kernels.dino_ce import dino_cross_entropy as dino_cross_entropy_triton
from dinovmf.kernels.teacher import teacher_distribution as teacher_distribution_triton

__all__ = ["dino_cross_entropy_triton", "teacher_distribution_triton"]
