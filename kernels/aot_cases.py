"""Every launch of a Triton kernel in `dinovmf.kernels`, as the host code makes it, for ahead-of-time
compilation without a GPU (the AOT check in tools/ and the static kernel report in bench/).

`launch_cases()` lists, per kernel, the argument types the host passes (pointers by dtype, i32 sizes and
strides, fp32 scalars), the constexpr variants it launches, the autotune configs (ROWS, num_warps) of the
tuned kernels, and the arguments the launcher sees as 16-aligned at K = 65536 (pointers, strides, K,
rows_per_group). Integer arguments equal to 1 are specialized by Triton into constants: `visit_inner` is
1 for the contract op (`ce_rows`) and S for the per-logits API, so both appear, and `ones_cases()` has
one launch per kernel with every integer argument that can be 1 set to 1 (one column range when
K <= 2048, B = 1, T = 1, one row): code that treats such an argument as a tensor (`n.to(...)`) fails
there and only there, which the interpreter (no specialization) cannot show. Nothing here needs a GPU.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

from dinovmf.kernels import ce_rows, teacher, tiling, vmf_bias

ISSUE_K = 65536
_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class LaunchCase(NamedTuple):
    label: str
    kernel: object  # triton.runtime.JITFunction
    signature: dict  # runtime argument -> triton type ("*fp32", "i32", "fp32", ...)
    constexprs: dict  # constexpr argument -> value (includes integers specialized to 1)
    aligned: tuple  # arguments the launcher marks 16-divisible at K = 65536
    num_warps: int


def _tune_configs(kernel_is_tuned: bool, quick: bool):
    if not kernel_is_tuned:
        return [(tiling.ROWS, tiling.NUM_WARPS)]
    return list(tiling.TUNE_CONFIGS[:1] if quick else tiling.TUNE_CONFIGS)


def _ce_cases(quick: bool):
    out = []
    dtypes = ["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16"]  # fp16 only through the per-logits API
    # (HAS_CS, HAS_BIAS, SAME_VIEW, visit_inner specialized to 1?): the fused op's variants (v with col_scale,
    # W without; vMF bias or not; DINO or iBOT same-view pairing) and the per-logits API (plain, image-major).
    variants = [(cs, bias, sv, True) for cs, bias, sv in itertools.product((True, False), repeat=3)]
    variants.append((False, False, False, False))
    if quick:
        variants = [(True, True, False, True), (False, False, False, False), (True, True, True, True)]
    for dt, (has_cs, has_bias, same_view, contract) in itertools.product(dtypes, variants):
        if dt == "fp16" and contract:
            continue
        flags = dict(HAS_CS=has_cs, HAS_BIAS=has_bias, SAME_VIEW=same_view)
        visit = {"visit_inner": 1} if contract else {}
        tag = f"L={dt} CS={int(has_cs)} BIAS={int(has_bias)} SAME_VIEW={int(same_view)} " \
              f"{'contract' if contract else 'per-logits'}"
        sig = dict(L=_PTR[dt], stride_l="i32", CS="*fp32", BIAS="*fp32", P="*fp32", stride_p="i32", ROW_INDEX="*i64",
                   PART="*fp32", n_rows="i32", K="i32", B="i32", T="i32", rows_per_group="i32", visit_outer="i32")
        if not contract:
            sig["visit_inner"] = "i32"
        aligned = ("L", "stride_l", "CS", "BIAS", "P", "stride_p", "ROW_INDEX", "K", "rows_per_group")
        for rows, warps in _tune_configs(True, quick):
            out.append(LaunchCase(f"_ce_partials_kernel {tag} ROWS={rows}", ce_rows._ce_partials_kernel,
                                  dict(sig, range_c="i32"), dict(flags, **visit, ROWS=rows, STEP=tiling.STATS_STEP),
                                  aligned + ("PART", "range_c"), warps))
        grad_variants = [(True, 1, False), (True, 2, False), (False, 1, False), (True, 0, True)] if contract else \
            [(True, 0, True)]  # (WRITE_GRAD, COL_SUM, GS_FROM_PTR): in place + bias gradient, per-group, ...
        if quick:
            grad_variants = grad_variants[:1]
        for write_grad, col_sum, gs_ptr in grad_variants:
            sig = dict(L=_PTR[dt], stride_l="i32", CS="*fp32", BIAS="*fp32", P="*fp32", stride_p="i32",
                       ROW_INDEX="*i64", STATS="*fp32", W="*fp32", GS="*fp32", GO=_PTR[dt], stride_go="i32",
                       CGS="*fp32", n_rows="i32", K="i32", B="i32", T="i32", rows_per_group="i32", visit_outer="i32",
                       grad_scale="fp32")
            if not contract:
                sig["visit_inner"] = "i32"
            cex = dict(flags, **visit, HAS_W=contract, GS_FROM_PTR=gs_ptr, WRITE_GRAD=write_grad, COL_SUM=col_sum,
                       ROWS=tiling.ROWS, BLOCK_C=tiling.STREAM_BLOCK)
            out.append(LaunchCase(f"_ce_grad_kernel {tag} WRITE_GRAD={int(write_grad)} COL_SUM={col_sum}",
                                  ce_rows._ce_grad_kernel, sig, cex,
                                  aligned + ("STATS", "W", "GS", "GO", "stride_go", "CGS"), tiling.NUM_WARPS))
    out.append(LaunchCase("_ce_finish_kernel", ce_rows._ce_finish_kernel,
                          dict(PART="*fp32", STATS="*fp32", n_rows="i32", n_blocks="i32"),
                          dict(BLOCK_R=tiling.FINISH_BLOCK_R, BLOCK_J=tiling.FINISH_BLOCK_J), ("PART", "STATS"), 4))
    return out


def _teacher_cases(quick: bool):
    out = []
    dtypes = ["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16"]  # fp16 only through teacher_distribution
    # mode -> (HAS_BY, WITH_X, STAT_KIND): y's column offsets precomputed on the host for every mode but none
    modes = {"logit": (True, False, teacher.STAT_MEAN_SCORE), "prob": (True, True, teacher.STAT_MEAN_SOFTMAX),
             "none": (False, False, teacher.STAT_NONE), "sinkhorn": (True, False, teacher.STAT_NONE)}
    cs_bias = list(itertools.product((True, False), repeat=2))
    if quick:
        modes, cs_bias = {k: modes[k] for k in ("prob", "sinkhorn")}, [(True, True)]
    aligned = ("D", "stride_d", "CS", "BIAS", "BY", "K", "rows_per_group")
    for dt, mode, (has_cs, has_bias) in itertools.product(dtypes, modes, cs_bias):
        if dt == "fp16" and has_cs:  # fp16 dots only through teacher_distribution (no column scale)
            continue
        has_by, with_x, stat_kind = modes[mode]
        flags = dict(HAS_CS=has_cs, HAS_BIAS=has_bias, HAS_BY=has_by)
        tag = f"D={dt} {mode} CS={int(has_cs)} BIAS={int(has_bias)}"
        sig = dict(D=_PTR[dt], stride_d="i32", CS="*fp32", BIAS="*fp32", BY="*fp32", PART="*fp32",
                   ARGMAX_PART="*i32", n_rows="i32", K="i32", inv_temp="fp32", range_c="i32", rows_per_group="i32")
        for rows, warps in _tune_configs(True, quick):
            out.append(LaunchCase(f"_teacher_partials_kernel {tag} ROWS={rows}", teacher._teacher_partials_kernel, sig,
                                  dict(flags, WITH_X=with_x, ROWS=rows, STEP=tiling.STATS_STEP),
                                  aligned + ("PART", "ARGMAX_PART", "range_c"), warps))
        sig = dict(D=_PTR[dt], stride_d="i32", CS="*fp32", BIAS="*fp32", BY="*fp32", ROW_STATS="*fp32", OUT="*fp32",
                   stride_o="i32", STAT="*fp32", n_rows="i32", K="i32", temp="fp32", inv_temp="fp32", inv_n="fp32",
                   rows_per_group="i32")
        out.append(LaunchCase(f"_teacher_probs_kernel {tag}", teacher._teacher_probs_kernel, sig,
                              dict(flags, STAT_KIND=stat_kind, ROWS=tiling.ROWS, BLOCK_C=tiling.STREAM_BLOCK),
                              aligned + ("ROW_STATS", "OUT", "stride_o", "STAT"), tiling.NUM_WARPS))
        if mode == "sinkhorn":
            sig = dict(D=_PTR[dt], stride_d="i32", CS="*fp32", BIAS="*fp32", ROW_SHIFT="*fp32", OUT="*fp32",
                       n_rows="i32", K="i32", inv_temp="fp32", rows_per_group="i32")
            out.append(LaunchCase(f"_column_lse_kernel D={dt} CS={int(has_cs)} BIAS={int(has_bias)}",
                                  teacher._column_lse_kernel, sig,
                                  dict(HAS_CS=has_cs, HAS_BIAS=has_bias, ROWS=tiling.ROWS,
                                       BLOCK_C=tiling.column_block(_BYTES[dt], tiling.NUM_WARPS)),
                                  ("D", "stride_d", "CS", "BIAS", "ROW_SHIFT", "OUT", "K", "rows_per_group"),
                                  tiling.NUM_WARPS))
    for has_x in (True, False):
        out.append(LaunchCase(f"_teacher_finish_kernel HAS_X={int(has_x)}", teacher._teacher_finish_kernel,
                              dict(PART="*fp32", ARGMAX_PART="*i32", ROW_STATS="*fp32", ROW_ARGMAX="*i64",
                                   n_rows="i32", n_blocks="i32", K="i32"),
                              dict(HAS_X=has_x, BLOCK_R=tiling.FINISH_BLOCK_R, BLOCK_J=tiling.FINISH_BLOCK_J),
                              ("PART", "ARGMAX_PART", "ROW_STATS", "ROW_ARGMAX", "K"), 4))
    return out


def launch_cases(quick: bool = False) -> list[LaunchCase]:
    """Every (kernel, signature, constexprs, num_warps) the host launches at K = 65536 (`quick`: one per
    kernel family and dtype, for CI)."""
    bias = LaunchCase("_column_bias_kernel", vmf_bias._column_bias_kernel,
                      dict(WN="*fp32", OUT="*fp32", K="i32", inv_temp="fp32", nu="fp32", z0="fp32", s0="fp32",
                           log_series0="fp32"),
                      dict(BLOCK_K=vmf_bias.BIAS_BLOCK_K), ("WN", "OUT", "K"), vmf_bias.BIAS_NUM_WARPS)
    return _ce_cases(quick) + _teacher_cases(quick) + [bias]


# Integer arguments that a real launch can pass as 1 (Triton then specializes them to constants).
_CAN_BE_ONE = ("n_rows", "n_blocks", "K", "B", "T", "rows_per_group", "range_c", "visit_outer", "stride_l",
               "stride_p", "stride_go", "stride_d", "stride_o")


def ones_cases() -> list[LaunchCase]:
    """One launch per kernel (first quick variant) with every integer argument that can be 1 set to 1."""
    seen, out = set(), []
    for c in launch_cases(quick=True):
        name = c.label.split()[0]
        if name in seen:
            continue
        seen.add(name)
        ones = {n: 1 for n in _CAN_BE_ONE if n in c.signature}
        out.append(c._replace(label=c.label + " ones", signature={k: v for k, v in c.signature.items() if k not in ones},
                              constexprs=dict(c.constexprs, **ones),
                              aligned=tuple(a for a in c.aligned if a not in ones)))
    return out
