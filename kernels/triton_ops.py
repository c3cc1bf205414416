"""The Triton backend's entry points, as registered in `dinovmf.backends` (one module per backend):
the contract ops `ce_rows_triton` / `teacher_rows_triton` and the per-logits API built on them."""
from dinovmf.kernels.ce_rows import ce_rows as ce_rows_triton
from dinovmf.kernels.dino_ce import dino_cross_entropy as dino_cross_entropy_triton
from dinovmf.kernels.teacher import teacher_distribution as teacher_distribution_triton
from dinovmf.kernels.teacher import teacher_rows as teacher_rows_triton

__all__ = ["ce_rows_triton", "teacher_rows_triton", "dino_cross_entropy_triton", "teacher_distribution_triton"]
