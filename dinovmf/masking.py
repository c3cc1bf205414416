"""iBOT block-wise masking of the student's global crops (masked image modelling).

Each image independently gets a target number of masked patches, ``floor(ratio * n_patches)`` with
``ratio ~ U[min_ratio, max_ratio]``; only a random ``mask_probability`` fraction of the images is masked
at all (the rest get an empty mask). The target is then covered by rectangular blocks exactly as in
BEiT's / iBOT's ``MaskingGenerator``:

    repeat:                                   # one "attempt"
        area   ~ U[min_block, remaining]      # remaining = target - masked so far
        aspect ~ exp(U[log a, -log a])        # a = min_aspect (0.3)
        h, w   = round(sqrt(area * aspect)), round(sqrt(area / aspect))
        if the block fits strictly inside the grid, place it uniformly at random and accept it
        if it adds at least one and at most `remaining` new patches
    until the target is reached or `max_attempts` attempts in a row were rejected

Unlike the reference (a Python loop per image and per patch), one attempt is made for every unfinished
image at once with array ops over its [H, W] grid, so a batch costs (the largest number of attempts any
image needs) small NumPy ops whose total size is linear in B. All randomness comes from the `generator` argument, so masks are
reproducible; they are built on the CPU (the data side) and moved to the device by the caller.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _check_grid(grid) -> tuple[int, int]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be a positive int or a pair (H, W) of positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_ratio_range(min_ratio: float, max_ratio: float) -> None:
    if not (0.0 <= min_ratio <= max_ratio <= 1.0):
        raise ValueError(f"min_ratio and max_ratio must satisfy 0 <= min_ratio <= max_ratio <= 1, "
                         f"got min_ratio={min_ratio!r}, max_ratio={max_ratio!r}")


def default_min_block(grid: tuple[int, int]) -> int:
    """iBOT's smallest block area, ``(min(H, W) // 3) ** 2`` (16 patches on a 14 x 14 grid), at least 1."""
    return max(1, (min(grid) // 3) ** 2)


def block_masks_for_targets(targets: torch.Tensor, grid, *, min_block: int | None = None,
                            min_aspect: float = 0.3, max_attempts: int = 10,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Block masks that cover (about) `targets[b]` patches of image b; bool [B, H*W], row-major patches.

    targets: int tensor [B] >= 0, the number of patches to mask per image. The count reached is at most
    the target and usually equal to it; it can fall short when `max_attempts` attempts in a row fail
    (e.g. no block of at least `min_block` patches fits the remaining gap) — the same rule as BEiT/iBOT.
    Runs on the CPU; see the module docstring for the algorithm.
    """
    height, width = _check_grid(grid)
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.is_floating_point():
        raise ValueError(f"targets must be a 1-D integer tensor [B], got {targets!r:.80}")
    if bool((targets < 0).any()) or bool((targets > height * width).any()):
        raise ValueError(f"targets must lie in [0, {height * width}] (the number of patches)")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
    min_block = default_min_block((height, width)) if min_block is None else min_block
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block!r}")

    # The loop runs in NumPy: its arrays are tiny (one [H, W] grid per unfinished image), where a NumPy op's
    # fixed cost is a fraction of a torch op's. The uniforms still come from `generator`.
    batch = targets.shape[0]
    targets_np = targets.to(torch.int64).cpu().numpy()
    mask = np.zeros((batch, height, width), dtype=bool)
    count = np.zeros(batch, dtype=np.int64)
    failures = np.zeros(batch, dtype=np.int64)
    rows = np.arange(height).reshape(1, height, 1)
    cols = np.arange(width).reshape(1, 1, width)
    log_aspect = math.log(min_aspect)

    # Work only on the images still placing blocks: the slowest image can need a few hundred attempts
    # (many small blocks near its target), so a full-batch step per attempt would cost O(B x that).
    idx = np.flatnonzero(targets_np > 0)
    while idx.size:
        u_area, u_aspect, u_top, u_left = torch.rand(4, idx.size, generator=generator,
                                                     dtype=torch.float64).numpy()
        remaining = targets_np[idx] - count[idx]
        area = min_block + (remaining - min_block) * u_area  # U between min_block and remaining
        aspect = np.exp(log_aspect - 2.0 * log_aspect * u_aspect)
        h = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint: round half to even, as Python's round
        w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (h < height) & (w < width)  # strict, as in BEiT: a block never spans the whole grid
        # randint(0, H - h) inclusive; the clamp keeps indices valid for blocks that do not fit.
        top = np.floor(u_top * np.maximum(height - h + 1, 1)).astype(np.int64).reshape(-1, 1, 1)
        left = np.floor(u_left * np.maximum(width - w + 1, 1)).astype(np.int64).reshape(-1, 1, 1)
        block = ((rows >= top) & (rows < top + h.reshape(-1, 1, 1))
                 & (cols >= left) & (cols < left + w.reshape(-1, 1, 1)))
        current = mask[idx]
        new = (block & ~current).sum(axis=(1, 2))
        accept = fits & (new > 0) & (new <= remaining)
        mask[idx] = current | (block & accept.reshape(-1, 1, 1))
        count[idx] += np.where(accept, new, 0)
        failures[idx] = np.where(accept, 0, failures[idx] + 1)
        idx = idx[(count[idx] < targets_np[idx]) & (failures[idx] < max_attempts)]
    return torch.from_numpy(mask.reshape(batch, height * width))


class BlockMaskGenerator:
    """iBOT masks for a batch of global crops: ``gen(batch_size, generator) -> bool [B, n_patches]``.

    Args:
        grid: the patch grid of a global crop, ``(H, W)`` or an int for a square grid
            (``global_size // patch_size``).
        min_ratio, max_ratio: each masked image masks ``floor(U[min_ratio, max_ratio] * n_patches)``
            patches (iBOT: 0 .. 0.3).
        mask_probability: the fraction of images that are masked at all; exactly
            ``round(B * mask_probability)`` images, chosen at random (as DINOv2's collate does), so the
            number of masked images — which the patch loss averages over — does not fluctuate.
        min_aspect: block aspect ratios are log-uniform in ``[min_aspect, 1/min_aspect]``.
        min_block: smallest block area in patches (None: iBOT's ``(min(H, W) // 3) ** 2``).
        max_attempts: rejected blocks in a row after which an image keeps the mask it has.
    """

    def __init__(self, grid, min_ratio: float = 0.0, max_ratio: float = 0.3,
                 mask_probability: float = 0.5, min_aspect: float = 0.3,
                 min_block: int | None = None, max_attempts: int = 10):
        self.grid = _check_grid(grid)
        _check_ratio_range(min_ratio, max_ratio)
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability!r}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect!r}")
        if min_block is not None and min_block < 1:
            raise ValueError(f"min_block must be >= 1, got {min_block!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        self.mask_probability = float(mask_probability)
        self.min_aspect = float(min_aspect)
        self.min_block = default_min_block(self.grid) if min_block is None else int(min_block)
        self.max_attempts = int(max_attempts)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def targets(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Patches to mask per image, int64 [B]: 0 for unselected images, floor(ratio * n) otherwise."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        n_masked_images = round(batch_size * self.mask_probability)
        selected = torch.zeros(batch_size, dtype=torch.bool)
        selected[torch.randperm(batch_size, generator=generator)[:n_masked_images]] = True
        ratio = self.min_ratio + (self.max_ratio - self.min_ratio) * torch.rand(
            batch_size, generator=generator, dtype=torch.float64)
        targets = torch.floor(ratio * self.n_patches).to(torch.int64)
        return torch.where(selected, targets, 0)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool masks [batch_size, n_patches] on the CPU (True = the student sees the mask token)."""
        return block_masks_for_targets(self.targets(batch_size, generator), self.grid,
                                       min_block=self.min_block, min_aspect=self.min_aspect,
                                       max_attempts=self.max_attempts, generator=generator)

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator(grid={self.grid}, ratio=[{self.min_ratio}, {self.max_ratio}], "
                f"mask_probability={self.mask_probability}, min_aspect={self.min_aspect}, "
                f"min_block={self.min_block})")
