"""Launch geometry of the column-tiled Triton kernels (`ce_rows`, `teacher_rows`).

Every pass over a [rows, K] matrix runs on a grid (column blocks, row groups): program (j, g) owns a
block of columns and walks the rows of group g in tiles of ROWS rows. Owning columns means the [K]
vectors (column scale, bias, center) are read once per program and tile rather than once per row,
column sums (the bias gradient, the center statistic) stay in registers and are written without
atomics, and the rows of one image (the host orders chunks image-major) share their teacher rows
through L1 within a tile. Row groups exist to fill the GPU when the column blocks alone do not; each
group writes its own column partials, summed on the host.

Three grids per call (`ColumnPlan`):
* `stats` (pass 1, row statistics): a program owns a 2048-column range and walks it in steps of
  [ROWS, 128] for each tile of rows: at 4 warps a warp holds whole 128-column rows, so the one row-max
  reduction per step is a warp shuffle, never a barrier. Partials: one per (row, range), 32 per row at
  K = 65536.
* `stream` (the passes that write: gradient, probs): [ROWS, 256] tiles, no reduction inside the loop.
* `columns` (the Sinkhorn column log-sum-exp): 32 lanes x num_warps x one 16-byte vector of columns,
  so that a column's rows live in one thread and the max over rows needs no barrier either.

On a GPU the read-only passes are autotuned over (ROWS, num_warps); under the interpreter (CPU tests)
one fixed config runs. The interpreter runs one program at a time at a cost per tile op (about 25 ms
per tile, whatever its size), so it uses 4096-column tiles; tests also force the GPU geometry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

ROWS = 8  # rows per tile
NUM_WARPS = 4
STATS_STEP = 128  # pass 1: 32 lanes x 4 fp32 per step, so a warp holds whole rows
STATS_RANGE = 2048  # pass 1: columns per program
STREAM_BLOCK = 256  # gradient / probs passes: one fp32 row segment is 1 KiB
INTERPRETER_STEP = 4096
INTERPRETER_RANGE = 16384
CTAS_PER_SM = 4  # grid target when the column blocks alone do not fill the GPU
MIN_ROWS_PER_GROUP = MAX_ROWS = 16  # a row group is at least one tile of the largest ROWS
MIN_STATS_RANGE = 512  # pass 1 halves its range (more programs, more partials) down to this
FINISH_BLOCK_R = 32  # finish kernels: rows per program ...
FINISH_BLOCK_J = 16  # ... and ranges merged per step (32 spills 4 bytes in ptxas 12.9 and 13.4)

# (ROWS, num_warps) tried by the autotuner on a GPU; the first is the interpreter's fixed config.
TUNE_CONFIGS = ((ROWS, NUM_WARPS), (16, 4), (16, 8), (4, 4))


@dataclass(frozen=True)
class Grid:
    """Program (j, g) owns columns [j*cols, (j+1)*cols), walked `step` at a time, and the rows
    [g*rows_per_group, (g+1)*rows_per_group)."""
    cols: int
    step: int
    n_col_blocks: int
    groups: int
    rows_per_group: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_col_blocks, self.groups)


@dataclass(frozen=True)
class ColumnPlan:
    stats: Grid
    stream: Grid
    columns: Grid


def column_block(element_size: int, num_warps: int) -> int:
    """Columns of a `columns` program: 32 lanes x num_warps x one 16-byte vector, so that every row of a
    column lives in one thread."""
    return 32 * num_warps * (16 // element_size)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gpu_sms(device: torch.device, sm_count: int | None) -> int | None:
    """The SM count to plan for: `sm_count` if given (a GPU's plan computed elsewhere: the static kernel
    model), the device's on a GPU, None when the interpreter runs the kernels."""
    if sm_count is not None:
        return sm_count
    return _sm_count(device) if device.type == "cuda" and not INTERPRETING else None


def _grid(n_rows: int, K: int, cols: int, step: int, sms: int | None, groups: int | None) -> Grid:
    step = min(step, max(16, triton.next_power_of_2(K)))
    cols = max(step, min(cols, triton.cdiv(K, step) * step))
    n_col_blocks = triton.cdiv(K, cols)
    if groups is None:
        groups = 1
        if sms is not None:
            groups = min(triton.cdiv(CTAS_PER_SM * sms, n_col_blocks), triton.cdiv(n_rows, MIN_ROWS_PER_GROUP))
    groups = max(1, min(groups, n_rows))
    rows_per_group = triton.cdiv(triton.cdiv(n_rows, groups), MAX_ROWS) * MAX_ROWS
    return Grid(cols, step, n_col_blocks, max(1, triton.cdiv(n_rows, rows_per_group)), rows_per_group)


def column_plan(n_rows: int, K: int, device: torch.device, element_size: int = 4, *, groups: int | None = None,
                stream_block: int | None = None, stats_step: int | None = None,
                stats_range: int | None = None, sm_count: int | None = None) -> ColumnPlan:
    """The three grids for `n_rows` x `K` of `element_size`-byte inputs; the keywords force a geometry
    (tests run every layout under the interpreter), `sm_count` plans as on a GPU with that many SMs."""
    sms = _gpu_sms(torch.device(device), sm_count)
    if sms is None:
        step, rng, block, col_block = INTERPRETER_STEP, INTERPRETER_RANGE, INTERPRETER_STEP, INTERPRETER_STEP
    else:
        step, rng, block = STATS_STEP, STATS_RANGE, STREAM_BLOCK
        col_block = column_block(element_size, NUM_WARPS)
    step, block = stats_step or step, stream_block or block
    col_block = stream_block or col_block
    if stats_range is None and sms is not None:
        # Few rows (a chunk sized to L2, say): shorter ranges give pass 1 the programs the rows cannot.
        target, row_groups = CTAS_PER_SM * sms, triton.cdiv(n_rows, MIN_ROWS_PER_GROUP)
        while rng > MIN_STATS_RANGE and triton.cdiv(K, rng) * row_groups < target:
            rng //= 2
    return ColumnPlan(stats=_grid(n_rows, K, stats_range or max(rng, step), step, sms, groups),
                      stream=_grid(n_rows, K, block, block, sms, groups),
                      columns=_grid(n_rows, K, col_block, col_block, sms, groups))


@triton.jit
def column_vector(PTR, cols, cmask, HAS: tl.constexpr, default: tl.constexpr):
    """PTR[cols] of a [K] vector (column scale, bias, ...), or `default` when it is absent (HAS false).
    Inside a streaming loop pass `cols` broadcast to the tile's shape [R, C]: the load then gets the
    tile's own layout (the R copies are L1 hits). A [C] or [1, C] load gets one element per thread
    (Triton caps a load's vector at numel / threads) and is moved into the tile's layout through shared
    memory: two barriers per vector and step."""
    if HAS:
        return tl.load(PTR + cols, mask=cmask, other=default)
    else:
        return tl.full(cols.shape, default, tl.float32)


@triton.jit
def stats_program(n_rows, K, range_c, rows_per_group):
    """A `stats` program's share: its column range [c_start, c_end), its rows [start, end), and the
    offsets of its partials in a [n, n_ranges, n_rows] buffer (offset of this range, plane of one n)."""
    j = tl.program_id(0)
    c_start = j * range_c
    start = tl.program_id(1) * rows_per_group
    return (c_start, tl.minimum(c_start + range_c, K), start, tl.minimum(start + rows_per_group, n_rows),
            j.to(tl.int64) * n_rows, tl.num_programs(0).to(tl.int64) * n_rows)


@triton.jit
def stream_program(n_rows, K, rows_per_group, BLOCK_C: tl.constexpr):
    """A `stream` / `columns` program's share: its row group g, columns cols [1, BLOCK_C] (and mask),
    and its rows [start, end)."""
    g = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    start = g * rows_per_group
    return g, cols, cols < K, start, tl.minimum(start + rows_per_group, n_rows)


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
