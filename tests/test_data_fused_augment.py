"""The fused augmentation (C++ kernel csrc/augment_cpu.cpp, every vector path; Triton kernel kernels/augment.py
under the interpreter) against the batched torch reference run in float64 (`assert_matches_reference`,
tolerance explained there), per op and composed, for probabilities 0 and 1, uint8 and float inputs, and
sizes that hit the vector tails and the blur's clamps.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _augment_checks import assert_matches_reference

from dinovmf.config import AugmentConfig, CropsConfig
from dinovmf.data import augment as A
from dinovmf.data import augment_params as P
from dinovmf.data.crops import crop_key
from dinovmf.data.fused import CPU_ISAS, MultiCropAugmentation, cpu_isa_supported, fused_augment

# Every op alone with probability 1, none, all of them, and DINO's recipe (views: 0, 1 = global, 2 = local).
ALL_OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
RECIPES = {
    "none": (ALL_OFF, 1),
    "flip": (dict(ALL_OFF, flip_p=1.0), 1),
    "brightness": (dict(ALL_OFF, jitter_p=1.0, contrast=0.0, saturation=0.0, hue=0.0, brightness=0.9), 1),
    "contrast": (dict(ALL_OFF, jitter_p=1.0, brightness=0.0, saturation=0.0, hue=0.0, contrast=0.9), 1),
    "saturation": (dict(ALL_OFF, jitter_p=1.0, brightness=0.0, contrast=0.0, hue=0.0, saturation=0.9), 1),
    "hue": (dict(ALL_OFF, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5), 1),
    "gray": (dict(ALL_OFF, gray_p=1.0), 1),
    "blur": (dict(ALL_OFF, blur_p=(1.0, 1.0, 1.0)), 1),
    "solarize": (dict(ALL_OFF, solarize_p=1.0), 1),
    "all": (dict(flip_p=1.0, jitter_p=1.0, gray_p=1.0, blur_p=(1.0, 1.0, 1.0), solarize_p=1.0, hue=0.5), 1),
    "dino_global2": ({}, 1),
    "dino_local_strong": (dict(brightness=1.5, contrast=1.5, saturation=1.5, hue=0.5, blur_sigma=(0.5, 3.0)), 2),
}
SIZES = [(1, 1), (1, 7), (2, 3), (5, 7), (13, 21), (17, 33)]  # tails of 4 / 8 / 16 lanes, blur radius clamps


def _params(recipe_name: str, n: int, seed: int = 0) -> torch.Tensor:
    overrides, view = RECIPES[recipe_name]
    recipe = P.crop_recipes(AugmentConfig(**overrides), CropsConfig())[view]
    return torch.from_numpy(P.draw_params([crop_key(seed, i, 0, 0, view) for i in range(n)], recipe))


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _isas():
    return [isa for isa in ("baseline", "avx2", "avx512") if cpu_isa_supported(isa)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpp_matches_reference_per_op_and_composed(recipe, isa):
    if not cpu_isa_supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    for h, w in SIZES:
        images = _images(8, h, w, seed=h * 100 + w)
        params = _params(recipe, 8, seed=h + w)
        assert_matches_reference(fused_augment(images, params, isa=isa), images, params)


@pytest.mark.parametrize("recipe", ["none", "all", "dino_global2", "hue", "blur"])
def test_cpp_float_input_matches_uint8_input(recipe):
    """Float [N, 3, H, W] crops in [0, 1] give what their uint8 [N, H, W, 3] originals give."""
    images = _images(16, 13, 21)
    params = _params(recipe, 16)
    assert_matches_reference(fused_augment(A.to_float_nchw(images), params), images, params)


def test_cpp_vector_paths_agree_and_are_deterministic():
    images = _images(32, 17, 37)
    params = _params("dino_local_strong", 32)
    outs = [fused_augment(images, params, isa=isa) for isa in _isas()]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=5e-6, rtol=0)
    assert torch.equal(fused_augment(images, params), fused_augment(images, params))


def test_cpp_result_does_not_depend_on_the_thread_count():
    """Crops are independent: the split of the batch over threads changes nothing, bit for bit."""
    images = _images(24, 20, 20)
    params = _params("dino_global2", 24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_augment(images, params)
        torch.set_num_threads(3)
        three = fused_augment(images, params)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    assert torch.equal(fused_augment(images[5:6], params[5:6]), one[5:6])


def test_cpp_rejects_bad_input():
    images, params = _images(2, 4, 4), _params("none", 2)
    with pytest.raises(ValueError, match="images must be"):
        fused_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), params)
    with pytest.raises(ValueError, match="params must be"):
        fused_augment(images, params[:, :5])
    bad = params.clone()
    bad[0, P.OP0:P.OP3 + 1] = torch.tensor([0.0, 0.0, 1.0, 2.0])
    with pytest.raises(RuntimeError, match="permutation"):
        fused_augment(images, bad)
    bad = _params("blur", 2)
    bad[1, P.SIGMA] = 0.0
    with pytest.raises(RuntimeError, match="sigma"):
        fused_augment(images, bad)
    with pytest.raises(RuntimeError, match="not supported|isa"):
        load = torch.ops.dinovmf.augment_crops
        load(images, params, list(A.IMAGENET_MEAN), list(A.IMAGENET_STD), 7)
    assert set(CPU_ISAS) == {"auto", "baseline", "avx2", "avx512"}


def test_multicrop_augmentation_groups_crops_by_size():
    """MultiCropAugmentation (the device path) gives, crop by crop, what fused_augment gives."""
    b = 3
    crops = [_images(b, 16, 16, seed=1), _images(b, 16, 16, seed=2), _images(b, 8, 8, seed=3), _images(b, 8, 8, seed=4)]
    recipes = P.crop_recipes(AugmentConfig(), CropsConfig(n_local=2))
    params = torch.from_numpy(np.stack([P.draw_params([crop_key(0, i, i, 0, c) for c in range(4)], recipes)
                                        for i in range(b)]))
    out = MultiCropAugmentation("cpu")(crops, params)
    assert [tuple(o.shape) for o in out] == [(b, 3, 16, 16)] * 2 + [(b, 3, 8, 8)] * 2
    for c, crop in enumerate(crops):
        assert torch.equal(out[c], fused_augment(crop, params[:, c]))
    with pytest.raises(ValueError, match="params must be"):
        MultiCropAugmentation("cpu")(crops, params[:, :3])


# ------------------------------------------------------------------------------------------ Triton
# Under TRITON_INTERPRET=1 (set by conftest without a GPU) on CPU tensors; the interpreter is slow, so
# fewer and smaller crops than for the C++ kernel.

def test_triton_matches_reference_per_op_and_composed():
    """Every recipe's rows in one launch per size (the interpreter's cost is per program run)."""
    from dinovmf.kernels.augment import augment_crops_triton
    for h, w in [(1, 1), (2, 3), (9, 11)]:
        params = torch.cat([_params(recipe, 2, seed=h * w + i) for i, recipe in enumerate(sorted(RECIPES))])
        images = _images(params.shape[0], h, w, seed=h + w)
        out = augment_crops_triton(images, params, A.IMAGENET_MEAN, A.IMAGENET_STD)
        assert_matches_reference(out, images, params)


def test_triton_float_input_and_dino_batch():
    from dinovmf.kernels.augment import augment_crops_triton
    images = _images(16, 12, 19)
    params = _params("dino_global2", 16)
    out = augment_crops_triton(A.to_float_nchw(images).contiguous(), params, A.IMAGENET_MEAN, A.IMAGENET_STD)
    assert_matches_reference(out, images, params)
    assert augment_crops_triton(images[:0], params[:0], A.IMAGENET_MEAN, A.IMAGENET_STD).shape == (0, 3, 12, 19)


def test_triton_kernels_compile_for_hopper():
    """The interpreter does not catch what only the compiler rejects: compile every augmentation case of the
    kernel registry (tools/triton_cases.py: uint8 and float sources, both blur passes, 1-pixel crops) for sm_90."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "tools.triton_aot", "--arch", "90", "--only", "augment."], cwd=root,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK   sm_90 augment.") == 9, proc.stdout
