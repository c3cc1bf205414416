"""THE registry of how the host code launches every @triton.jit kernel of `dinovmf.kernels`.

Three tables, kept together because they change together with the kernels:

* `cases()`: the ahead-of-time compile cases (`tools/triton_aot.py`: `make test` compiles the `ci` subset,
  `make cuda-check` all): for every kernel the host launches, the argument types, constexprs and num_warps
  the host passes at the issue sizes (S=12, T=2, B=64, K=65536, p=256; fp32 / bf16 / fp16 data). Integer
  arguments the launcher specialises are said so: `aligned_ints` (multiples of 16 at those sizes) and
  `specialized` (ints passed as 1, which Triton turns into constants: `visit_inner` of every fused-op launch,
  and, in the `ones` cases, every integer that can be 1 — code that treats such an argument as a tensor
  (`n.to(...)`) fails to compile there and only there, which the interpreter cannot show). A `tuned` kernel
  (`kernels.tiling.tuned`) is compiled once per autotune config; its case omits ROWS and num_warps.
* `DEVICE_FUNCTIONS`: the @triton.jit helpers only kernels call. A @triton.jit function in neither table
  fails the AOT check, and so does a stale entry.
* `WORKLOADS`: the host entry points that launch those kernels, run under the Triton interpreter by
  `tools/triton_bytes.py` to count the bytes of each launch (`tools/kernel_model.py`) and by
  tests/test_triton_aot.py to check that every launch they make matches a case here.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

ISSUE_SIZES = dict(S=12, T=2, B=64, K=65536)
P_DIM = 256  # bottleneck dim
TEMP_S, TEMP_T = 0.1, 0.04
MODES = ("logit", "prob", "none", "sinkhorn")

# @triton.jit functions only ever called from other kernels (never launched from the host).
DEVICE_FUNCTIONS = frozenset({
    "ce_rows._visited_rows", "ce_rows._teacher_mass", "teacher._dots_tile",
    "softmax_tiles.zero_if_empty", "softmax_tiles.online_rescale", "softmax_tiles.online_exp_update",
    "softmax_tiles.online_exp_sum", "softmax_tiles.merge_block_stats", "softmax_tiles.partials_tile",
    "softmax_tiles.partials_max", "softmax_tiles.merge_partials", "softmax_tiles.column_lse_step",
    "tiling.column_vector", "tiling.stats_program", "tiling.stream_program",
    "augment._clamp01", "augment._jitter_op", "augment._jitter_steps", "augment._load_source",
    "augment._contrast_step", "augment._finish", "augment._blur_radius",
})


@dataclass(frozen=True)
class Case:
    """One launch configuration of one kernel, as the host code passes it."""
    kernel: str  # "<module>.<function>" inside dinovmf.kernels, e.g. "ce_rows._ce_grad_kernel"
    signature: Mapping[str, str]  # runtime argument -> Triton type ("*fp32", "*bf16", "i32", "fp32")
    constexprs: Mapping[str, object]  # tl.constexpr argument -> the value the host passes
    num_warps: int = 4  # Triton's default when the launch does not say
    num_stages: int = 3
    aligned_ints: tuple[str, ...] = ()  # int arguments that are multiples of 16 at the issue sizes
    ci: bool = False  # in the representative subset compiled by `make test`
    tuned: bool = False  # autotuned (kernels.tiling.tuned): ROWS and num_warps come from each config
    specialized: Mapping[str, int] = field(default_factory=dict)  # runtime ints passed as 1 (constants)

    @property
    def label(self) -> str:
        ptrs = " ".join(f"{a}={t[1:]}" for a, t in self.signature.items() if t.startswith("*") and t != "*fp32")
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        ones = " ".join(f"{k}=1" for k in self.specialized)
        return " ".join(x for x in (self.kernel, ptrs or "all-fp32", consts, ones) if x)


def _ptr(dtype: str) -> str:
    return f"*{dtype}"


# ------------------------------------------------------------------------------------------ ce_rows
def _ce_cases(ce, tiling) -> list[Case]:
    """The fused op's launches (head_to_loss: col_scale always, vMF bias or not, DINO or iBOT same-view
    pairing with row weights, gradient in place, bias gradient as one or per-group column sums; visit_inner
    1) and the per-logits API's (dino_cross_entropy: plain logits, visit_inner = S, gradient out of place)."""
    out = []
    fused = [(bias, sv) for bias in (True, False) for sv in (False, True)]
    for dt in ("fp32", "bf16", "fp16"):
        for contract, (bias, same_view) in [(True, v) for v in fused] + [(False, (False, False))]:
            flags = dict(HAS_CS=contract, HAS_BIAS=bias, SAME_VIEW=same_view)
            ci = dt in ("fp32", "bf16") and (not contract or (bias and not same_view) or (dt == "bf16" and same_view))
            ones = {"visit_inner": 1} if contract else {}
            common = dict(L=_ptr(dt), stride_l="i32", CS="*fp32", BIAS="*fp32", P="*fp32", stride_p="i32",
                          ROW_INDEX="*i64", n_rows="i32", K="i32", B="i32", T="i32", rows_per_group="i32",
                          visit_outer="i32", **({} if contract else {"visit_inner": "i32"}))
            # per-logits: n_rows = S*B = 768 and visit_outer = B = 64 are multiples of 16; a chunk (154 rows) is not
            aligned = ("stride_l", "stride_p", "K", "B", "rows_per_group")
            if not contract:
                aligned += ("n_rows", "visit_outer")
            out.append(Case("ce_rows._ce_partials_kernel", dict(common, PART="*fp32", range_c="i32"),
                            dict(flags, STEP=tiling.STATS_STEP), aligned_ints=aligned + ("range_c",), ci=ci,
                            tuned=True, specialized=ones))
            col_sums = (0, 1, 2) if bias and contract else (0,)  # 1: one row group owns the columns, 2: partials
            for col_sum in col_sums:
                out.append(Case("ce_rows._ce_grad_kernel",
                                dict(common, STATS="*fp32", W="*fp32", GO=_ptr(dt), stride_go="i32", CGS="*fp32",
                                     grad_scale="fp32"),
                                dict(flags, HAS_W=same_view, WRITE_GRAD=True, COL_SUM=col_sum, ROWS=tiling.ROWS,
                                     BLOCK_C=tiling.STREAM_BLOCK),
                                num_warps=tiling.NUM_WARPS, aligned_ints=aligned + ("stride_go",),
                                ci=ci and col_sum != 1, specialized=ones))
    out.append(Case("ce_rows._ce_finish_kernel", dict(PART="*fp32", STATS="*fp32", n_rows="i32", n_blocks="i32"),
                    dict(BLOCK_R=tiling.FINISH_BLOCK_R, BLOCK_J=tiling.FINISH_BLOCK_J), aligned_ints=("n_blocks",),
                    ci=True))
    return out


# ------------------------------------------------------------------------------------------ teacher_rows
def _teacher_cases(te, tiling) -> list[Case]:
    """teacher_rows as head_to_loss calls it (col_scale for (v, g), vMF bias or not, every mode) and as the
    per-logits teacher_distribution does (no col_scale), for every dots dtype."""
    out = []
    # mode -> (HAS_BY, WITH_X, STAT_KIND): y's column offsets are precomputed on the host for every mode but none
    modes = {"logit": (True, False, te.STAT_MEAN_SCORE), "prob": (True, True, te.STAT_MEAN_SOFTMAX),
             "none": (False, False, te.STAT_NONE), "sinkhorn": (True, False, te.STAT_NONE)}
    aligned = ("stride_d", "K", "n_rows", "rows_per_group")  # n_rows = T*B = 128
    for dt, mode, has_cs, has_bias in itertools.product(("fp32", "bf16", "fp16"), MODES, (True, False), (True, False)):
        has_by, with_x, stat_kind = modes[mode]
        flags = dict(HAS_CS=has_cs, HAS_BIAS=has_bias, HAS_BY=has_by)
        ci = has_cs and has_bias and (dt, mode) in (("bf16", "prob"), ("fp32", "sinkhorn"))
        out.append(Case("teacher._teacher_partials_kernel",
                        dict(D=_ptr(dt), stride_d="i32", CS="*fp32", BIAS="*fp32", BY="*fp32", PART="*fp32",
                             ARGMAX_PART="*i32", n_rows="i32", K="i32", inv_temp="fp32", range_c="i32",
                             rows_per_group="i32"),
                        dict(flags, WITH_X=with_x, STEP=tiling.STATS_STEP), aligned_ints=aligned + ("range_c",),
                        ci=ci, tuned=True))
        out.append(Case("teacher._teacher_probs_kernel",
                        dict(D=_ptr(dt), stride_d="i32", CS="*fp32", BIAS="*fp32", BY="*fp32", ROW_STATS="*fp32",
                             OUT="*fp32", stride_o="i32", STAT="*fp32", n_rows="i32", K="i32", temp="fp32",
                             inv_temp="fp32", inv_n="fp32", rows_per_group="i32"),
                        dict(flags, STAT_KIND=stat_kind, ROWS=tiling.ROWS, BLOCK_C=tiling.STREAM_BLOCK),
                        num_warps=tiling.NUM_WARPS, aligned_ints=aligned + ("stride_o",), ci=ci))
        if mode == "sinkhorn":
            element_size = 4 if dt == "fp32" else 2
            out.append(Case("teacher._column_lse_kernel",
                            dict(D=_ptr(dt), stride_d="i32", CS="*fp32", BIAS="*fp32", ROW_SHIFT="*fp32",
                                 OUT="*fp32", n_rows="i32", K="i32", inv_temp="fp32", rows_per_group="i32"),
                            dict(HAS_CS=has_cs, HAS_BIAS=has_bias, ROWS=tiling.ROWS,
                                 BLOCK_C=tiling.column_block(element_size, tiling.NUM_WARPS)),
                            num_warps=tiling.NUM_WARPS, aligned_ints=aligned, ci=ci or (dt, has_cs) == ("bf16", False)))
    for has_x in (True, False):
        out.append(Case("teacher._teacher_finish_kernel",
                        dict(PART="*fp32", ARGMAX_PART="*i32", ROW_STATS="*fp32", ROW_ARGMAX="*i64", n_rows="i32",
                             n_blocks="i32", K="i32"),
                        dict(HAS_X=has_x, BLOCK_R=tiling.FINISH_BLOCK_R, BLOCK_J=tiling.FINISH_BLOCK_J),
                        aligned_ints=("n_rows", "n_blocks", "K"), ci=has_x))
    return out


# ------------------------------------------------------------------------------------------ augmentation
def _augment_cases(au) -> list[Case]:
    """augment_crops_triton: uint8 [N, H, W, 3] crops from the GPU loader, or float [N, 3, H, W] tensors;
    224 and 96 px crops (H, W multiples of 16)."""
    norm = {k: "fp32" for k in ("mean_r", "mean_g", "mean_b", "istd_r", "istd_g", "istd_b")}
    out = []
    for u8 in (True, False):
        src = "*u8" if u8 else "*fp32"
        out.append(Case("augment._stage_kernel",
                        dict(SRC=src, PRM="*fp32", STAGE="*fp32", PARTIAL="*fp32", H="i32", W="i32", NBLOCKS="i32"),
                        dict(SRC_U8=u8, **au.CONSTEXPRS["stage"]), aligned_ints=("H", "W"), ci=True))
        out.append(Case("augment._photometric_kernel",
                        dict(SRC=src, PRM="*fp32", STAGE="*fp32", LUMA_SUM="*fp32", OUT="*fp32", H="i32", W="i32",
                             **norm),
                        dict(SRC_U8=u8, **au.CONSTEXPRS["photometric"]), aligned_ints=("H", "W"), ci=u8))
    for vertical in (False, True):
        out.append(Case("augment._blur_kernel", dict(SRC="*fp32", PRM="*fp32", DST="*fp32", H="i32", W="i32", **norm),
                        dict(VERTICAL=vertical, **au.CONSTEXPRS["blur"]), aligned_ints=("H", "W"), ci=vertical))
    return out


# Integer arguments that a real launch can pass as 1 (K <= 2048 gives one column range, B = 1, T = 1, one row,
# a 1-pixel side, a crop of at most BLOCK pixels).
CAN_BE_ONE = ("n_rows", "n_blocks", "K", "B", "T", "rows_per_group", "range_c", "visit_outer", "stride_l",
              "stride_p", "stride_go", "stride_d", "stride_o", "H", "W", "NBLOCKS")


def _ones_case(c: Case) -> Case:
    ones = {n: 1 for n in CAN_BE_ONE if c.signature.get(n) == "i32"}
    return replace(c, signature={k: v for k, v in c.signature.items() if k not in ones},
                   specialized={**c.specialized, **ones},
                   aligned_ints=tuple(a for a in c.aligned_ints if a not in ones), ci=True)


def cases() -> list[Case]:
    """Every compile case: the launches at the issue sizes, then one `ones` case per kernel (its first CI
    case with every integer that can be 1 set to 1). Imports the kernel modules for their launch constants."""
    from dinovmf.kernels import augment, ce_rows, teacher, tiling

    launched = _ce_cases(ce_rows, tiling) + _teacher_cases(teacher, tiling) + _augment_cases(augment)
    first_ci = {}
    for c in launched:
        if c.ci:
            first_ci.setdefault(c.kernel, c)
    return launched + [_ones_case(c) for c in first_ci.values()]


# ------------------------------------------------------------------------------------------ host workloads
# Batches the byte model counts a workload at (tools/kernel_model.py fits a + b B through them). The teacher's
# T*B = 8 and 16 rows fill whole 8-row tiles in one row group (a partly filled tile still loads its [K] vectors,
# and each row group its own: either bends the line; 2 points, so no third to check the line with); the
# student's S*B = 36..60 rows cost 6x more interpreter time per B and bend it by about 1% (the fit's reported
# residual); the augmentation's and the bias's counts are exactly affine.
STUDENT_BATCHES, TEACHER_BATCHES, SMALL_BATCHES = (3, 4, 5), (4, 8), (1, 2, 3)


@dataclass(frozen=True)
class Workload:
    """One call of a host entry point at sizes (S, T, B, K) and a data dtype; launches kernels."""
    name: str
    run: Callable[[int, int, int, int, object], None]
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batches: tuple[int, ...] = STUDENT_BATCHES


def _rand(*shape, scale=1.0):
    import torch
    return torch.randn(*shape) * scale


def _ce_rows(same_view: bool):
    """ce_rows as head_to_loss calls it for one chunk of all S*B rows: image-major rows, (v, g) column scale,
    the vMF bias, the gradient in place over the logits and the bias gradient (iBOT: same-view pairing with
    row weights)."""
    def run(S, T, B, K, dtype):
        import torch

        from dinovmf.head_loss import image_major_order
        from dinovmf.kernels.ce_rows import ce_rows

        rows = torch.arange(S * B) if same_view else image_major_order(S, B, "cpu")
        logits = _rand(S * B, K, scale=3).to(dtype)
        probs = torch.softmax(_rand(S * B if same_view else T * B, K, scale=3), dim=1)
        weight = torch.rand(S * B) + 0.5 if same_view else None
        ce_rows(logits, torch.rand(K) + 9.5, _rand(K), probs, rows, B, T, same_view, weight, 0.01, logits,
                torch.zeros(K))
    return run


def _cross_entropy(S, T, B, K, dtype):
    """The public per-logits API on the Triton backend, forward and backward."""
    import torch

    from dinovmf.loss import dino_cross_entropy

    logits = _rand(S, B, K, scale=3).to(dtype).requires_grad_()
    dino_cross_entropy(logits, torch.softmax(_rand(T, B, K, scale=3), dim=-1), backend="triton").backward()


def _teacher_rows(mode: str):
    """teacher_rows as head_to_loss calls it: (v, g) column scale, the vMF bias, probs over fp32 dots."""
    def run(S, T, B, K, dtype):
        import torch

        from dinovmf.kernels.teacher import teacher_rows

        dots = _rand(T * B, K).clamp_(-1, 1).to(dtype)
        center = {"logit": torch.zeros(K), "prob": torch.full((K,), 1.0 / K)}.get(mode)
        out = dots if dtype == torch.float32 else None  # in place over fp32 dots, as head_to_loss does
        teacher_rows(dots, TEMP_T, mode, center, torch.rand(K) + 0.5, _rand(K), out)
    return run


def _teacher_distribution(S, T, B, K, dtype):
    """The public per-logits teacher (prob centering, vMF bias from the norms) on the Triton backend."""
    import torch

    from dinovmf.centering import teacher_distribution

    teacher_distribution(_rand(T * B, K).clamp_(-1, 1).to(dtype), TEMP_T, "prob", torch.full((K,), 1.0 / K),
                         torch.rand(K) + 0.5, P_DIM, backend="triton")


def _augment(S, T, B, K, dtype):
    """augment_crops_triton on B images' DINO crops (2 x 224 + 10 x 96 px, whatever S, T and K) as the GPU
    loader hands them over (uint8 [n, s, s, 3]), one call per crop size. Every crop draws jitter and blur
    (sigma 1 px: radius 3): the most a crop moves, the same for every image, so counts are affine in B
    (drawn parameters would make them depend on which crops happened to draw what)."""
    from bench.bench_augment import multicrop_batch
    from dinovmf.kernels import augment_layout as P
    from dinovmf.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from dinovmf.kernels.augment import augment_crops_triton

    for images, params in multicrop_batch(B):
        params[:, [P.JITTER, P.BLUR]], params[:, P.SIGMA] = 1.0, 1.0
        augment_crops_triton(images, params, IMAGENET_MEAN, IMAGENET_STD)


WORKLOADS = (
    Workload("ce_rows fused dino_vmf", _ce_rows(False)),
    Workload("ce_rows fused ibot same-view", _ce_rows(True), dtypes=("bfloat16",)),
    Workload("dino_cross_entropy fwd+bwd", _cross_entropy),
    *(Workload(f"teacher_rows {m}", _teacher_rows(m), batches=TEACHER_BATCHES) for m in MODES),
    Workload("teacher_distribution prob", _teacher_distribution, dtypes=("float32",), batches=TEACHER_BATCHES),
    Workload("augment uint8 crops", _augment, dtypes=("uint8",), batches=SMALL_BATCHES),
)
