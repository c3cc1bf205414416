"""The Triton backend's entry points, as registered in `dinovmf.backends` (one module per backend): the
two contract ops. The per-logits API (`dinovmf.loss.dino_cross_entropy`, `dinovmf.centering.
teacher_distribution`) is host code shared by every backend, not redefined here."""
from dinovmf.kernels.ce_rows import ce_rows as ce_rows_triton
from dinovmf.kernels.teacher import teacher_rows as teacher_rows_triton

__all__ = ["ce_rows_triton", "teacher_rows_triton"]
