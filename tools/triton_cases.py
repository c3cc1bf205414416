"""THE registry of how the host code launches every @triton.jit kernel of `dinovmf.kernels`.

Two tables, kept next to each other because they change together with the kernels:

* `cases()`: the ahead-of-time compile cases (`tools/triton_aot.py`, `make test` / `make cuda-check`): for
  every launched kernel, the signatures and constexprs the host really passes at the issue sizes
  (S=12, T=2, B=64, K=65536; fp32 / bf16 / fp16 data, the launch's num_warps). A kernel defined in
  `dinovmf.kernels` with no case, and not listed in `DEVICE_FUNCTIONS`, fails the check.
* `WORKLOADS`: the host ops that launch those kernels, which `bench/kernel_model.py` runs under the Triton
  interpreter to count the bytes each launch moves. Every launch they make must match a case above
  (kernel, constexprs, pointer dtypes, num_warps), so the compiled facts are those of the real launches.

When a kernel changes: update its cases (and its workload if the host entry point changed). Pointer
arguments are compiled as 16-byte aligned (torch allocations are); `aligned_ints` lists the integer
arguments that are multiples of 16 at the issue sizes, as Triton's launcher would specialise them. For an
`@triton.autotune` kernel give only the constexprs that are not tuned: every autotune config is compiled.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

# The issue's sizes (issue #16 §2): 12 student views, 2 teacher views, 64 images, DINO's 65536 prototypes.
ISSUE_SIZES = dict(S=12, T=2, B=64, K=65536)
P_DIM = 256  # bottleneck dim: the in-kernel Debye vMF bias runs for p >= 32
TEMP_S, TEMP_T = 0.1, 0.04

# @triton.jit functions that are only ever called from other kernels (never launched from the host).
DEVICE_FUNCTIONS = frozenset({
    "teacher._column_bias", "teacher._shifted", "teacher._online_lse_step", "teacher._finish_lse",
    "vmf_bias.log_cp_diff", "vmf_bias._log1p",
})


@dataclass(frozen=True)
class Case:
    """One launch configuration of one kernel, as the host code passes it."""
    kernel: str  # "<module>.<function>" inside dinovmf.kernels, e.g. "dino_ce._ce_fwd_kernel"
    signature: Mapping[str, str]  # every runtime argument -> Triton type ("*fp32", "*bf16", "i32", "fp32")
    constexprs: Mapping[str, object]  # every tl.constexpr argument -> the value the host passes
    num_warps: int = 4  # Triton's default when the launch does not say
    num_stages: int = 3
    aligned_ints: tuple[str, ...] = ()  # int arguments that are multiples of 16 at the issue sizes
    ci: bool = False  # in the representative subset compiled by `make test`

    @property
    def label(self) -> str:
        ptrs = " ".join(f"{a}={t[1:]}" for a, t in self.signature.items()
                        if t.startswith("*") and t != "*fp32")
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        return " ".join(x for x in (self.kernel, ptrs or "all-fp32", consts) if x)


def _ce_cases(ce) -> list[Case]:
    out = []
    for ld, pd in itertools.product(("fp32", "bf16", "fp16"), ("fp32", "bf16")):
        block = dict(BLOCK_K=ce._block_k(ISSUE_SIZES["K"]))
        out.append(Case("dino_ce._ce_fwd_kernel",
                        dict(L=f"*{ld}", P=f"*{pd}", ROW_LOSS="*fp32", ROW_LSE="*fp32", ROW_PSUM="*fp32",
                             B="i32", K="i32", T="i32"),
                        block, num_warps=8, aligned_ints=("B", "K"), ci=(ld, pd) == ("bf16", "fp32")))
        out.append(Case("dino_ce._ce_bwd_kernel",
                        dict(L=f"*{ld}", P=f"*{pd}", ROW_LSE="*fp32", ROW_PSUM="*fp32", G="*fp32", DL=f"*{ld}",
                             B="i32", K="i32", T="i32", scale="fp32"),
                        block, num_warps=8, aligned_ints=("B", "K"), ci=(ld, pd) == ("fp32", "fp32")))
    return out


def _teacher_cases(te) -> list[Case]:
    out = []
    block = te._block_k(ISSUE_SIZES["K"])
    # (MODE, WRITE_PROBS, WRITE_LSE) exactly as teacher_distribution's row_pass launches them.
    row_launches = [(te.MODE_NONE, True, False), (te.MODE_LOGIT, True, False), (te.MODE_PROB, True, False),
                    (te.MODE_SHIFT, False, True), (te.MODE_SHIFT, True, False)]
    bias_kinds = (te.BIAS_NONE, te.BIAS_DEBYE, te.BIAS_TENSOR)
    for dd in ("fp32", "bf16", "fp16"):
        for (mode, wp, wl), bk in itertools.product(row_launches, bias_kinds):
            out.append(Case("teacher._teacher_row_kernel",
                            dict(D=f"*{dd}", WN="*fp32", BIAS="*fp32", CENTER="*fp32", SHIFT="*fp32",
                                 PROBS="*fp32", STAT="*fp32", ROW_LSE="*fp32", K="i32", temp="fp32",
                                 inv_temp="fp32", inv_n="fp32", nu="fp32", z0="fp32", s0="fp32",
                                 log_series0="fp32"),
                            dict(MODE=mode, BIAS_KIND=bk, WRITE_PROBS=wp, WRITE_LSE=wl, BLOCK_K=block),
                            num_warps=8, aligned_ints=("K",),
                            ci=(dd, mode, bk) in (("bf16", te.MODE_PROB, te.BIAS_DEBYE),
                                                  ("fp32", te.MODE_SHIFT, te.BIAS_TENSOR))))
        for bk in bias_kinds:
            out.append(Case("teacher._column_lse_kernel",
                            dict(D=f"*{dd}", WN="*fp32", BIAS="*fp32", ROW_SHIFT="*fp32", OUT="*fp32", N="i32",
                                 K="i32", inv_temp="fp32", nu="fp32", z0="fp32", s0="fp32", log_series0="fp32"),
                            dict(BIAS_KIND=bk, BLOCK_K=block), num_warps=8, aligned_ints=("K",),
                            ci=(dd, bk) == ("fp16", te.BIAS_DEBYE)))
    return out


def cases() -> list[Case]:
    """Every compile case (imports the kernel modules for their launch constants)."""
    from dinovmf.kernels import dino_ce, teacher

    column_bias = Case("vmf_bias._column_bias_kernel",
                       dict(WN="*fp32", OUT="*fp32", K="i32", inv_temp="fp32", nu="fp32", z0="fp32", s0="fp32",
                            log_series0="fp32"),
                       dict(BLOCK_K=1024), num_warps=4, aligned_ints=("K",), ci=True)
    return _ce_cases(dino_ce) + _teacher_cases(teacher) + [column_bias]


# ----------------------------------------------------------------------------------- host workloads
@dataclass(frozen=True)
class Workload:
    """One call of a host entry point at sizes (S, T, B, K) and a data dtype; launches kernels."""
    name: str
    run: Callable[[int, int, int, int, torch.dtype], None]
    dtypes: tuple[str, ...] = ("float32", "bfloat16")


def _cross_entropy(S, T, B, K, dtype):
    from dinovmf.kernels.triton_ops import dino_cross_entropy_triton

    logits = (torch.randn(S, B, K) * 3).to(dtype).requires_grad_()
    probs = torch.softmax(torch.randn(T, B, K) * 3, dim=-1)
    dino_cross_entropy_triton(logits, probs).backward()


def _teacher(mode: str):
    def run(S, T, B, K, dtype):
        from dinovmf.kernels.triton_ops import teacher_distribution_triton

        dots = torch.randn(T * B, K).clamp_(-1, 1).to(dtype)
        center = torch.full((K,), 1.0 / K) if mode == "prob" else torch.zeros(K)
        weight_norm = torch.rand(K) + 0.5
        teacher_distribution_triton(dots, TEMP_T, mode, center if mode in ("logit", "prob") else None,
                                    weight_norm, P_DIM)
    return run


def _column_bias(S, T, B, K, dtype):
    from dinovmf.kernels.vmf_bias import vmf_column_bias_triton

    vmf_column_bias_triton(torch.rand(K) + 0.5, TEMP_S, P_DIM)


WORKLOADS = (
    Workload("cross_entropy fwd+bwd", _cross_entropy),
    Workload("teacher logit (vMF)", _teacher("logit")),
    Workload("teacher prob (vMF)", _teacher("prob")),
    Workload("teacher none (vMF)", _teacher("none")),
    Workload("teacher sinkhorn (vMF)", _teacher("sinkhorn")),
    Workload("vmf column bias", _column_bias, dtypes=("float32",)),
)
