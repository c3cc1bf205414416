"""Compile the augmentation's Triton kernels (kernels/augment.py) for an NVIDIA target, no GPU needed.

    TRITON_INTERPRET=0 python tests/_triton_augment_aot.py 90 [80]

One case per kernel and source dtype, with the constexprs `augment_crops_triton` launches with; prints
"OK ..." per compiled case and exits 1 if any fails (used by tests/test_data_fused_augment.py).
"""
import os
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compiled, not interpreted, kernels
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-augment-aot-"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dinovmf.kernels import augment as K  # noqa: E402

ALIGNED = [["tt.divisibility", 16]]


def cases():
    """(label, kernel, runtime argument types, constexprs) as `augment_crops_triton` launches them."""
    norm = {k: "fp32" for k in ("mean_r", "mean_g", "mean_b", "istd_r", "istd_g", "istd_b")}
    for u8 in (True, False):
        src = "*u8" if u8 else "*fp32"
        yield (f"_stage_kernel u8={u8}", K._stage_kernel,
               dict(SRC=src, PRM="*fp32", STAGE="*fp32", PARTIAL="*fp32", H="i32", W="i32", NBLOCKS="i32"),
               dict(SRC_U8=u8, **K.CONSTEXPRS["stage"]))
        yield (f"_photometric_kernel u8={u8}", K._photometric_kernel,
               dict(SRC=src, PRM="*fp32", STAGE="*fp32", LUMA_SUM="*fp32", OUT="*fp32", H="i32", W="i32", **norm),
               dict(SRC_U8=u8, **K.CONSTEXPRS["photometric"]))
    for vertical in (False, True):
        yield (f"_blur_kernel vertical={vertical}", K._blur_kernel,
               dict(SRC="*fp32", PRM="*fp32", DST="*fp32", H="i32", W="i32", **norm),
               dict(VERTICAL=vertical, **K.CONSTEXPRS["blur"]))


def main(archs: list[int]) -> int:
    failures = 0
    for arch in archs:
        for label, fn, sig, constexprs in cases():
            pointers = [a for a, t in sig.items() if t.startswith("*")]
            try:
                src = ASTSource(fn=fn, signature=dict(sig, **{k: "constexpr" for k in constexprs}),
                                constexprs=constexprs, attrs={(fn.arg_names.index(a),): ALIGNED for a in pointers})
                triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, num_stages=1))
                print(f"OK sm_{arch} {label}")
            except Exception as e:  # noqa: BLE001 - report every failure
                failures += 1
                cause = e
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                print(f"FAIL sm_{arch} {label}: {type(cause).__name__}: {cause}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
