"""Fused DINO-vMF loss kernels (installed as `dinovmf.kernels`; never import a top-level `kernels`).

- `common`: host-side checks, pairing counts, Debye reference terms, the Sinkhorn-Knopp driver (no triton).
- `ce_rows`: Triton `ce_rows`, the fused cross-entropy of a chunk of student rows (statistics + gradient).
- `teacher`: Triton `teacher_rows` (every centering mode, center statistic, row entropy and argmax) and
  the public `teacher_distribution` on top of it.
- `dino_ce`: the per-logits `dino_cross_entropy` autograd function, on top of `ce_rows`.
- `softmax_tiles`: device functions for streaming softmax statistics (one row max per step, merges).
- `tiling`: the launch geometry (column blocks x row groups), autotuning, the [K]-vector load.
- `vmf_bias`: the fp32 Debye kernel of the vMF column bias, computed once per step.
- `aot_cases`: every kernel launch (signature, constexprs, num_warps) for ahead-of-time compilation.
- `triton_ops`: the Triton backend's entry points, as registered in `dinovmf.backends`.
- `testing`: float64 references, the tolerance rule and the GPU error model the backend tests share.
"""
