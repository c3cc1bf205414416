"""iBOT block masking (dinovmf.masking) against the reference algorithm (BEiT / iBOT MaskingGenerator).

The oracle below is iBOT's per-image loop, transcribed with Python's `random`; the vectorised generator
must produce masks with the same statistics (it cannot produce the same masks: the random streams differ).
"""
import math
import random

import pytest
import torch

from dinovmf.masking import BlockMaskGenerator, block_masks_for_targets, default_min_block


def ibot_reference_mask(target: int, height: int, width: int, rng: random.Random,
                        min_block: int, min_aspect: float = 0.3, max_attempts: int = 10) -> list[list[bool]]:
    """iBOT's `ImageFolderMask` block masking for one image (a plain loop, as in the original)."""
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = [[False] * width for _ in range(height)]
    count = 0
    while count < target:
        max_mask_patches = target - count
        delta = 0
        for _ in range(max_attempts):
            area = rng.uniform(min_block, max_mask_patches)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                covered = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - covered <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def test_shape_dtype_and_determinism():
    gen = BlockMaskGenerator((4, 6))
    a = gen(10, torch.Generator().manual_seed(3))
    b = gen(10, torch.Generator().manual_seed(3))
    c = gen(10, torch.Generator().manual_seed(4))
    assert a.shape == (10, 24) and a.dtype == torch.bool
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_exact_fraction_of_images_is_masked_and_counts_never_exceed_targets():
    # min_ratio > 0: every selected image has a target > 0, so the selected ones can be counted.
    gen = BlockMaskGenerator(14, min_ratio=0.05, mask_probability=0.5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    targets = gen.targets(31, g1)
    masks = gen(31, g2)  # same stream: draws the same targets first
    assert int((targets > 0).sum()) == round(31 * 0.5)
    counts = masks.sum(dim=1)
    assert bool((counts <= targets).all())
    assert bool((counts[targets == 0] == 0).all())


def test_target_ratios_are_uniform_on_the_configured_range():
    gen = BlockMaskGenerator(14, min_ratio=0.1, max_ratio=0.3, mask_probability=1.0)
    ratios = gen.targets(4000, torch.Generator().manual_seed(1)).double() / gen.n_patches
    # floor(u * n) / n is u minus U[0, 1/n) on average: mean (0.1 + 0.3) / 2 - 0.5 / n.
    expected_mean = 0.2 - 0.5 / gen.n_patches
    se = (0.2 / math.sqrt(12)) / math.sqrt(4000)
    assert abs(ratios.mean().item() - expected_mean) < 4 * se
    assert ratios.min().item() >= 0.1 - 1.0 / gen.n_patches and ratios.max().item() <= 0.3
    # Thirds of the range hold a third of the samples each (binomial sd ~ 0.0075).
    thirds = torch.histc(ratios.float(), bins=3, min=0.1 - 0.5 / 196, max=0.3 - 0.5 / 196) / 4000
    assert torch.allclose(thirds, torch.full((3,), 1 / 3, dtype=thirds.dtype), atol=0.035)


def test_realised_masks_match_the_ibot_reference_statistics():
    grid, n_images = 14, 1500
    gen = BlockMaskGenerator(grid, mask_probability=1.0)
    targets = gen.targets(n_images, torch.Generator().manual_seed(2))
    ours = block_masks_for_targets(targets, grid, generator=torch.Generator().manual_seed(5)).sum(dim=1)
    rng = random.Random(7)
    ref = torch.tensor([sum(map(sum, ibot_reference_mask(int(t), grid, grid, rng, default_min_block((grid, grid)))))
                        for t in targets])
    big = targets >= gen.min_block
    # Images whose target admits a full block: the shortfall (target - masked) has the same mean.
    short_ours = (targets - ours)[big].double()
    short_ref = (targets - ref)[big].double()
    se = math.sqrt((short_ours.var() + short_ref.var()).item() / big.sum().item())
    assert abs(short_ours.mean().item() - short_ref.mean().item()) < 4 * se + 1e-9
    # Small targets (below iBOT's smallest block) often stay unmasked, equally often in both.
    zero_ours = (ours[~big] == 0).double().mean().item()
    zero_ref = (ref[~big] == 0).double().mean().item()
    assert abs(zero_ours - zero_ref) < 0.08
    assert abs(ours.double().mean().item() - ref.double().mean().item()) < 0.03 * ref.double().mean().item() + 0.5


def _box_stats(mask: torch.Tensor) -> tuple[int, int, bool]:
    """Bounding-box height and width of a non-empty [H, W] mask, and whether it fills its box."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return box.shape[0], box.shape[1], bool(box.all())


def test_block_shapes_match_the_ibot_reference():
    # Small targets (6 patches, min_block 6 on a 9 x 11 grid) need one or two blocks: the shapes of the
    # bounding boxes and how often the mask is a single filled rectangle must match iBOT's loop.
    height, width, target, n_images = 9, 11, 6, 600
    ours = block_masks_for_targets(torch.full((n_images,), target, dtype=torch.long), (height, width),
                                   min_block=target, generator=torch.Generator().manual_seed(0))
    rng = random.Random(1)
    ref = [torch.tensor(ibot_reference_mask(target, height, width, rng, min_block=target))
           for _ in range(n_images)]
    stats = {}
    for name, masks in (("ours", list(ours.view(-1, height, width))), ("ref", ref)):
        boxes = [_box_stats(m) for m in masks if m.any()]
        stats[name] = (len(boxes) / n_images,
                       sum(h for h, _, _ in boxes) / len(boxes),
                       sum(w for _, w, _ in boxes) / len(boxes),
                       sum(full for _, _, full in boxes) / len(boxes))
    nonempty, mean_h, mean_w, filled = (abs(a - b) for a, b in zip(stats["ours"], stats["ref"]))
    assert nonempty < 0.08 and filled < 0.08, stats
    assert mean_h < 0.25 and mean_w < 0.25, stats
    # Aspect ratios are symmetric in log space: blocks are as often tall as wide.
    assert abs(stats["ours"][1] - stats["ours"][2]) < 0.3, stats


def test_degenerate_settings_mask_nothing_or_everything_requested():
    assert not BlockMaskGenerator(8, mask_probability=0.0)(16, torch.Generator().manual_seed(0)).any()
    assert not BlockMaskGenerator(8, max_ratio=0.0)(16, torch.Generator().manual_seed(0)).any()
    gen = BlockMaskGenerator(14, min_ratio=0.3, max_ratio=0.3, mask_probability=1.0)
    counts = gen(64, torch.Generator().manual_seed(0)).sum(dim=1)
    target = math.floor(0.3 * 196)
    assert bool((counts <= target).all()) and (counts == target).double().mean().item() > 0.4
    assert gen(0).shape == (0, 196)


@pytest.mark.parametrize("kwargs, name", [
    ({"grid": 0}, "grid"), ({"grid": (3, 4, 5)}, "grid"),
    ({"grid": 4, "min_ratio": 0.4, "max_ratio": 0.3}, "min_ratio"),
    ({"grid": 4, "max_ratio": 1.5}, "max_ratio"),
    ({"grid": 4, "mask_probability": 1.5}, "mask_probability"),
    ({"grid": 4, "min_aspect": 0.0}, "min_aspect"),
    ({"grid": 4, "min_block": 0}, "min_block"),
    ({"grid": 4, "max_attempts": 0}, "max_attempts"),
])
def test_bad_generator_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockMaskGenerator(**kwargs)


def test_bad_targets_and_batch_size_raise():
    with pytest.raises(ValueError, match="targets"):
        block_masks_for_targets(torch.tensor([1.0, 2.0]), 4)
    with pytest.raises(ValueError, match="targets"):
        block_masks_for_targets(torch.tensor([17]), 4)
    with pytest.raises(ValueError, match="batch_size"):
        BlockMaskGenerator(4)(-1)
