"""Multi-crop sampling: where each crop is cut, and which samples a rank reads.

Both loaders (FFCV and the PIL fallback) cut the crops of the config's `CropsConfig` with
`random_crop_box` and order samples with `epoch_order`, so they see the same crop distribution and
the same shards; `augment_params` draws each crop's augmentation from the same key.

Determinism without RNG state. FFCV decodes a batch in numba threads (`prange`), whose per-thread
random streams are not reproducible, and its compiled pipeline cannot be handed a new epoch number
without recompiling. So a crop's randomness is a pure function of a key built from
(seed, sample index, position in the batch, first sample of the batch, crop index): the epoch
enters through the order (the permutation changes with the epoch, so an image lands in a different
batch at a different position), and the same (seed, epoch, rank) gives the same crops on any thread.
The hash works on values below 2**32 with multipliers below 2**27, so every product fits in a signed
64-bit integer and the code gives identical results in plain Python and under numba.
"""
from __future__ import annotations

import math

import numpy as np

try:  # numba comes with FFCV; the decoders call these functions from compiled code
    from numba.extending import register_jitable as _jitable
except ImportError:  # the PIL fallback calls them from Python only
    def _jitable(fn):
        return fn

_MASK32 = 0xFFFFFFFF
# Aspect-ratio range of torchvision's RandomResizedCrop, which DINO uses unchanged.
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@_jitable
def hash32(x: int) -> int:
    """A 32-bit integer mixer (the '0x45d9f3b' hash); input and output in [0, 2**32)."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


@_jitable
def crop_key(seed: int, sample: int, position: int, batch_first: int, crop: int) -> int:
    """The 32-bit key of one crop of one sample in one batch (see the module docstring)."""
    k = hash32(seed)
    k = hash32(k ^ (sample & _MASK32))
    k = hash32(k ^ (position & _MASK32))
    k = hash32(k ^ (batch_first & _MASK32))
    return hash32(k ^ (crop & _MASK32))


@_jitable
def key_uniform(key: int, counter: int) -> float:
    """The `counter`-th uniform number in [0, 1) of the stream named by `key`."""
    return hash32(key ^ hash32(counter + 0x9E37)) / 4294967296.0


@_jitable
def random_crop_box(height: int, width: int, scale_lo: float, scale_hi: float,
                    log_ratio_lo: float, log_ratio_hi: float, key: int):
    """(top, left, h, w) of a RandomResizedCrop box, torchvision's algorithm driven by `key`.

    Ten tries at an area fraction uniform in [scale_lo, scale_hi] and a log-uniform aspect ratio;
    if none fits, the largest centred box whose aspect ratio is within range.
    """
    area = height * width
    for attempt in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * key_uniform(key, 4 * attempt))
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * key_uniform(key, 4 * attempt + 1))
        w = int(math.floor(math.sqrt(target_area * aspect) + 0.5))
        h = int(math.floor(math.sqrt(target_area / aspect) + 0.5))
        if 0 < w <= width and 0 < h <= height:
            top = int(key_uniform(key, 4 * attempt + 2) * (height - h + 1))
            left = int(key_uniform(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < math.exp(log_ratio_lo):
        w = width
        h = int(math.floor(w / math.exp(log_ratio_lo) + 0.5))
    elif in_ratio > math.exp(log_ratio_hi):
        h = height
        w = int(math.floor(h * math.exp(log_ratio_hi) + 0.5))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True, start: int = 0) -> np.ndarray:
    """Sample indices rank `rank` reads in epoch `epoch`: a disjoint, equal-sized shard per rank.

    All ranks draw the same permutation (seeded by (seed, epoch)) and take every `world_size`-th
    entry from `rank`; the tail that does not divide evenly is dropped, so every rank runs the same
    number of steps (a rank with an extra batch would hang the others in all-reduce). So global batch b
    (b-th batch of every rank) is entries [b G, (b + 1) G) of the permutation, G the global batch, and
    `start` (entries already trained on: a resumed epoch) shards only what follows: resuming at
    `start = b G` on the same world size gives the same batches as reading on from batch b, and on
    another world size reads each remaining entry exactly once.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_samples < world_size:
        raise ValueError(f"num_samples={num_samples} is smaller than world_size={world_size}")
    if not 0 <= start <= num_samples:
        raise ValueError(f"start must be in [0, num_samples={num_samples}], got {start}")
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    order = order[start:]
    per_rank = len(order) // world_size
    return order[rank::world_size][:per_rank].astype(np.int64)
