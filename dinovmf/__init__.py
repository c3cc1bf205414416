"""dinovmf: DINO-vMF / iBOT-vMF self-supervised pretraining with fused kernels."""
__version__ = "0.1.0"
