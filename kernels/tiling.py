"""Launch geometry of the column-tiled Triton kernels (`ce_rows`, `teacher_rows`).

Every pass over a [rows, K] matrix runs on a grid (column blocks, row groups): program (j, g) owns the
BLOCK_C columns of block j and walks the rows of group g in tiles of [ROWS, BLOCK_C]. Owning a column
block means the [K] vectors (column scale, bias, center) are read once per program instead of once
per row, column sums (the bias gradient, the center statistic) stay in registers and are written
without atomics, and consecutive rows of one image (the host orders chunks image-major) share their
teacher rows through L1 within a tile. Row groups only exist to fill the GPU when K / BLOCK_C is
small; each group writes its own column partials, summed on the host.

On a GPU the row-streaming passes are autotuned over (ROWS, num_warps); under the interpreter (CPU
tests) one fixed config runs. BLOCK_C is fixed because the partial buffers are sized from it. The
interpreter runs one program at a time at a cost per tile op (about 25 ms per tile, whatever its
size), so it uses 4096-column blocks; tests also run the GPU geometry (`column_plan(block_c=256)`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

BLOCK_C = 256  # one fp32 row segment is 1 KiB; K = 65536 gives 256 column programs (132 SMs on H100)
INTERPRETER_BLOCK_C = 4096
ROWS = 8  # [8, 256] tiles: 16 fp32 per thread at 4 warps, i.e. 4 x 128-bit loads per operand
NUM_WARPS = 4
MAX_ROWS = 16  # the largest ROWS of an autotune config; row groups are a multiple of it
CTAS_PER_SM = 4  # grid target when K / BLOCK_C alone does not fill the GPU
MIN_ROWS_PER_GROUP = 64  # below this a row group's loop is too short to hide its set-up
FINISH_BLOCK_R = 64  # finish kernels: rows per program ...
FINISH_BLOCK_J = 32  # ... and column blocks merged per step

# (ROWS, num_warps) tried by the autotuner on a GPU; the first is the interpreter's fixed config.
TUNE_CONFIGS = ((ROWS, NUM_WARPS), (16, 8), (4, 4), (16, 4))


@dataclass(frozen=True)
class ColumnPlan:
    """Grid of one column-tiled pass: program (j, g) owns columns [j*block_c, (j+1)*block_c) and the
    rows [g*rows_per_group, (g+1)*rows_per_group)."""
    n_rows: int
    block_c: int
    n_col_blocks: int
    groups: int
    rows_per_group: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_col_blocks, self.groups)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def column_plan(n_rows: int, K: int, device: torch.device, groups: int | None = None,
                block_c: int | None = None) -> ColumnPlan:
    """The plan for `n_rows` x `K`; `groups` and `block_c` force the row-group count and the column
    block (tests run every layout under the interpreter)."""
    if block_c is None:
        block_c = INTERPRETER_BLOCK_C if INTERPRETING else BLOCK_C
    block_c = min(block_c, max(16, triton.next_power_of_2(K)))
    n_col_blocks = triton.cdiv(K, block_c)
    if groups is None:
        groups = 1
        if device.type == "cuda" and not INTERPRETING:
            groups = min(triton.cdiv(CTAS_PER_SM * _sm_count(device), n_col_blocks),
                         triton.cdiv(n_rows, MIN_ROWS_PER_GROUP))
    groups = max(1, min(groups, n_rows))
    rows_per_group = triton.cdiv(triton.cdiv(n_rows, groups), MAX_ROWS) * MAX_ROWS
    return ColumnPlan(n_rows, block_c, n_col_blocks, max(1, triton.cdiv(n_rows, rows_per_group)), rows_per_group)


def tuned(kernel):
    """`kernel` autotuned over TUNE_CONFIGS on a GPU; unchanged under the interpreter. Only for kernels
    whose launches are idempotent (they overwrite their outputs): the autotuner runs them repeatedly."""
    if INTERPRETING:
        return kernel
    configs = [triton.Config({"ROWS": rows}, num_warps=warps) for rows, warps in TUNE_CONFIGS]
    return triton.autotune(configs=configs, key=["K"])(kernel)


def launch(kernel, grid, *args, **constexprs) -> None:
    """Launch a `tuned` kernel: the autotuner picks ROWS / num_warps on a GPU, the fixed config else."""
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel[grid](*args, **constexprs)
    else:
        kernel[grid](*args, ROWS=ROWS, num_warps=NUM_WARPS, **constexprs)
