"""Fused DINO-vMF loss kernels (installed as `dinovmf.kernels`; never import a top-level `kernels`).

- `common`: host-side checks, pairing counts, Debye reference terms, the Sinkhorn-Knopp driver (no triton).
- `dino_ce`: Triton cross-entropy forward/backward + autograd wrapper.
- `teacher`: Triton teacher distribution (vMF bias, centering, sharpening, softmax, center stat).
- `vmf_bias`: the fp32 Debye device function for the vMF column bias.
- `triton_ops`: the Triton backend's two entry points, as registered in `dinovmf.backends`.
- `testing`: float64 oracles and the per-dtype tolerance rule the backend tests share.
"""
