"""The random parameters of DINO's photometric augmentation: how they are drawn.

Every crop gets one row of `NUM_PARAMS` float32 values in the layout of `dinovmf.kernels.augment_layout`
(re-exported here), which every implementation of the augmentation reads (the batched torch reference in
`augment.py`, the C++ op in csrc/augment_cpu.cpp, the Triton kernel in kernels/augment.py), so all of them
apply the same augmentation to the same crop and can be tested against each other.

Drawing. A crop's parameters are a pure function of its crop key (`crops.crop_key`: seed, sample,
position in the batch, first sample of the batch, crop index), read as the counter-based uniforms
`key_uniform(key, AUG_COUNTER + i)`; the crop box uses counters below AUG_COUNTER of the same key.
So a crop's augmentation, like its box, depends on (seed, epoch, rank, batch) only through the
epoch's order, never on a thread schedule or on other crops, and the decoders can draw it per image
inside their parallel loops (FFCV's numba threads, the PIL workers). A resumed run re-creates the
order and so the same augmentation.

The per-crop probabilities and strengths come from `crop_recipes(augment, crops)`: the config's
`AugmentConfig` laid out per crop, with DINO's per-view split (blur with probability blur_p[0] on
the first global crop, blur_p[1] on the second, blur_p[2] on the local crops; solarisation on the
second global crop only).
"""
from __future__ import annotations

import numpy as np

# The row layout is the kernels' contract (dinovmf.kernels.augment_layout); re-exported so the data path
# reads one module for both the layout and the drawing.
from dinovmf.kernels.augment_layout import (BLUR, BRIGHTNESS, CONTRAST, FLIP, GRAY, HUE, JITTER, JITTER_OPS,  # noqa: F401
                                            NUM_PARAMS, OP0, OP1, OP2, OP3, PARAM_NAMES, SATURATION, SIGMA,
                                            SOLARIZE)

from .crops import _jitable, key_uniform


RECIPE_NAMES = ("flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "gray_p", "blur_p",
                "sigma_lo", "sigma_hi", "solarize_p")
NUM_RECIPE = len(RECIPE_NAMES)
# The crop box draws 4 uniforms per try, 10 tries (crops.random_crop_box): counters 0..39.
AUG_COUNTER = 64


def crop_recipes(augment, crops) -> np.ndarray:
    """float64 [num_crops, NUM_RECIPE]: the `AugmentConfig` `augment` for each crop of `crops`
    (`CropsConfig`), global crops first (columns `RECIPE_NAMES`)."""
    def row(view: int) -> list[float]:
        return [augment.flip_p, augment.jitter_p, augment.brightness, augment.contrast, augment.saturation,
                augment.hue, augment.gray_p, augment.blur_p[view], augment.blur_sigma[0], augment.blur_sigma[1],
                augment.solarize_p if view == 1 else 0.0]
    views = [0, 1][:crops.n_global] + [2] * crops.n_local
    return np.array([row(v) for v in views], dtype=np.float64)


@_jitable
def draw_crop_params(key: int, recipe, out) -> None:
    """Write the parameters of the crop with key `key` and recipe row `recipe` into `out` [NUM_PARAMS].

    Every draw is made whatever the earlier ones gave, in a fixed order, so a parameter does not
    depend on which ops were drawn; an op's factor is drawn even when the op is not applied.
    """
    c = AUG_COUNTER
    out[0] = 1.0 if key_uniform(key, c + 0) < recipe[0] else 0.0            # flip
    out[1] = 1.0 if key_uniform(key, c + 1) < recipe[1] else 0.0            # jitter
    # A uniformly random order of the four jitter ops in out[2:6] (Fisher-Yates with 3 uniforms).
    for i in range(4):
        out[2 + i] = i
    for i in range(3, 0, -1):
        j = min(int(key_uniform(key, c + 5 - i) * (i + 1)), i)
        out[2 + i], out[2 + j] = out[2 + j], out[2 + i]
    # Factors uniform in [max(0, 1 - s), 1 + s], torchvision ColorJitter's range for strength s.
    for i in range(3):
        lo = max(0.0, 1.0 - recipe[2 + i])
        out[6 + i] = lo + (1.0 + recipe[2 + i] - lo) * key_uniform(key, c + 5 + i)
    out[9] = recipe[5] * (2.0 * key_uniform(key, c + 8) - 1.0)             # hue shift in +- h
    out[10] = 1.0 if key_uniform(key, c + 9) < recipe[6] else 0.0           # grayscale
    out[11] = 1.0 if key_uniform(key, c + 10) < recipe[7] else 0.0          # blur
    out[12] = recipe[8] + (recipe[9] - recipe[8]) * key_uniform(key, c + 11)  # sigma
    out[13] = 1.0 if key_uniform(key, c + 12) < recipe[10] else 0.0         # solarize


def draw_params(keys, recipes: np.ndarray) -> np.ndarray:
    """float32 [len(keys), NUM_PARAMS]: `draw_crop_params` of each key with its recipe row (a
    [len(keys), NUM_RECIPE] array, or one row for all)."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    recipes = np.broadcast_to(np.asarray(recipes, dtype=np.float64), (len(keys), NUM_RECIPE))
    out = np.empty((len(keys), NUM_PARAMS), dtype=np.float32)
    for i in range(len(keys)):
        draw_crop_params(int(keys[i]), recipes[i], out[i])
    return out
