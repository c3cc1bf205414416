"""Fused DINO-vMF loss kernels (installed as `dinovmf.kernels`; never import a top-level `kernels`).

- `common`: host-side checks, pairing counts, Debye reference terms, the Sinkhorn-Knopp driver (no triton).
- `ce_rows`: Triton `ce_rows`, the fused cross-entropy of a chunk of student rows (statistics + gradient).
- `teacher`: Triton `teacher_rows` (every centering mode, center statistic, row entropy and argmax).
- `softmax_tiles`: device functions for streaming softmax statistics (one row max per step, merges).
- `tiling`: the launch geometry (column blocks x row groups), autotuning, the [K]-vector load.
- `triton_ops`: the Triton backend's entry points, as registered in `dinovmf.backends`.
- `augment`: the Triton kernels of the fused photometric augmentation (GPU data path).

The per-logits API (`dino_cross_entropy`, `teacher_distribution`) lives in `dinovmf.loss` /
`dinovmf.centering`, on top of any backend's two ops. How the host launches each kernel (compile cases,
device-only helpers, host workloads) is `tools/triton_cases.py`.
"""
